"""`torch.compile(fullgraph=True)` of a merged layer (router, mask, curvature, merge, token
products): one graph for a fixed shape, no recompilation over training steps, eager's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from camex.merging import curvature, kronecker_apply, merge
from camex.merging.curvature import kronecker_traced
from camex.moe import KroneckerCurvature, MergedExpertLinear, NoisyTopKGate, TiesMask, UnitRouter


def _layer(n: int = 3, out: int = 6, inp: int = 10, rank: int = 2, kind: str = "camex_ties") -> MergedExpertLinear:
    torch.manual_seed(0)
    layer = MergedExpertLinear(
        in_features=inp,
        out_features=out,
        num_experts=n,
        bias=True,
        router=UnitRouter(gate=NoisyTopKGate(in_features=inp, num_experts=n, top_k=2, noisy=False), unit="sequence"),
        mask=TiesMask() if kind == "camex_ties" else None,
        curvature=None
        if kind == "euclid"
        else KroneckerCurvature(num_experts=n, rank=rank, out_features=out, in_features=inp, bias=True),
    )
    with torch.no_grad():  # experts and base start uninitialised (upcycling loads them); factors at the identity
        for name, p in layer.named_parameters():
            p.copy_(p + torch.randn_like(p) * 0.1 if "factors" in name else torch.randn_like(p) * 0.3)
    return layer


def _steps(layer, run, xs) -> list[torch.Tensor]:
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    outs = []
    for x in xs:
        y = run(x)
        layer.router.gate.pop_aux()
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
    return outs


@pytest.mark.parametrize("kind", ["camex_ties", "camex", "euclid"])
def test_merged_layer_compiles_fullgraph_without_recompiles(monkeypatch, kind):
    """`aot_eager` traces forward and backward as the compiler would (inductor only generates code
    from the same graphs, and is too slow to build on a CPU test runner). Eager tiles of one row
    and curvature blocks of one expert, as a large layer has on the CPU: the Python tile loops
    over changing slices are what must stay out of the graph. Without a mask the eager passes
    take τ inside their tiles and blocks and reuse γ̃'s memory; compiled, the plain forms."""
    monkeypatch.setattr(merge, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(curvature, "CPU_BLOCK_BYTES", 1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters of earlier compilations
    layer = _layer(kind=kind)
    eager = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 5, 10, generator=g) for _ in range(3)]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _steps(layer, compiled, xs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want = _steps(eager, eager, xs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    # evaluation: no autograd (a new graph), the operands computed inside it (not the eval cache,
    # whose key reads storage addresses), still right after the parameters change in place
    torch._dynamo.reset()
    layer.eval()
    eager.eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for x in xs:
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
            layer.router.gate.pop_aux()  # as the model-level hook does after every forward
            for p, q in zip(layer.parameters(), eager.parameters()):
                p.mul_(0.9)
                q.mul_(0.9)


def test_traced_curvature_matches_the_hand_written_passes():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(3, 6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    factors = [torch.randn(2, 3, d, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (2, 3, 2, 5)]
    want = kronecker_apply(tau, factors, scale=0.7)
    got = kronecker_traced(tau.view(3, 2, 3, 2, 5), factors, scale=0.7).view_as(tau)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn(3, 6, 10, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((got * w).sum(), [tau, *factors]), torch.autograd.grad((want * w).sum(), [tau, *factors])
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ep_chain_compiles_fullgraph_without_recompiles():
    """EP-CAMEx: three layers of one shape chained through one base expert (the later layers store
    none) compile into one graph for a fixed shape, train three steps without recompiling and
    match eager, which memoises the chain's links per pass."""
    from torch import nn

    from camex.moe.chain import ExpertChain

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    n, d = 3, 6
    layers = [
        MergedExpertLinear(
            in_features=d,
            out_features=d,
            num_experts=n,
            bias=True,
            router=UnitRouter(gate=NoisyTopKGate(in_features=d, num_experts=n, top_k=2, noisy=False), unit="sequence"),
            curvature=KroneckerCurvature(num_experts=n, rank=2, out_features=d, in_features=d, bias=True),
            store_base=i == 0,
        )
        for i in range(3)
    ]
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                p.copy_(p + torch.randn_like(p) * 0.1 if "factors" in name else torch.randn_like(p) * 0.3)
    ExpertChain(layers, beta=0.5)
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1], nn.Tanh(), layers[2])
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 5, d, generator=g) for _ in range(3)]

    def steps(net, run):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        outs = []
        for x in xs:
            y = run(x)
            for m in net.modules():
                if isinstance(m, NoisyTopKGate):
                    m.pop_aux()
            y.square().mean().backward()
            opt.step()
            opt.zero_grad()
            outs.append(y.detach())
        return outs

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = steps(model, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for a, b in zip(got, steps(eager, eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
