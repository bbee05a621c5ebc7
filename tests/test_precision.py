"""Mixed precision: every variant trains and evaluates under autocast, merging in fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from camex import MoEOptions, list_variants, upcycle
from camex.merging import merge, merge_flat, merged_linear

# (arch, variant): every variant on BERT (sequence units), and the other routing units (GPT-2
# segments, T5 encoder memory, ViT) with the curvature-aware variants and SMoE.
CASES = [("bert", v) for v in list_variants()] + [
    (arch, v) for arch in ("gpt2", "t5", "vit") for v in ("smoe", "camex_ties", "ep_camex")
]


def _two_steps(model, tiny, batches, device: str, dtype: torch.dtype) -> tuple[list[float], torch.Tensor]:
    """Two AdamW steps (fp32 master weights) under autocast, then an eval forward under autocast."""
    torch.manual_seed(1)  # the same DARE masks and gate noise in every precision
    model = copy.deepcopy(model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    on = dtype != torch.float32
    losses = []
    model.train()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=on):
            loss = tiny.loss(model, batch)
        loss.backward()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=on):
        out = tiny.outputs(model, {k: v.to(device) for k, v in batches[0].items()}).float().cpu()
    return losses, out


def _compare(arch: str, variant: str, device: str, dtype: torch.dtype) -> None:
    tiny = TINY[arch]
    torch.manual_seed(0)
    model = upcycle(tiny.make(), variant, MoEOptions(num_experts=3, rank=2, alpha=0.75, segment_len=4))
    g = torch.Generator().manual_seed(0)
    batches = [tiny.batch(g) for _ in range(2)]
    want, out_want = _two_steps(model, tiny, batches, device, torch.float32)
    got, out_got = _two_steps(model, tiny, batches, device, dtype)
    assert all(torch.isfinite(torch.tensor(got))), got
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=1e-2)
    assert torch.isfinite(out_got).all()
    scale = out_want.abs().max().clamp(min=1.0)  # T5's LM logits are large: compare relatively
    torch.testing.assert_close(out_got / scale, out_want / scale, rtol=0, atol=8e-2)


@pytest.mark.parametrize("arch,variant", CASES)
def test_two_steps_under_bf16_autocast_match_fp32(arch, variant):
    _compare(arch, variant, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch,variant", CASES)
def test_two_steps_under_cuda_autocast_match_fp32(arch, variant, dtype):
    _compare(arch, variant, "cuda", dtype)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("bias", [False, True])
def test_merged_linear_under_autocast_keeps_tiles_and_accumulates_in_fp32(bias, monkeypatch):
    """Under bf16 autocast the merged linear still builds one row tile at a time (here: one row,
    rebuilt in the backward pass) and agrees with merging in fp32, casting the weight to bf16 and
    multiplying in bf16; the parameters' gradients come back in fp32."""
    monkeypatch.setattr(merge, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(merge, "CPU_KEEP_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    units, n, out, inp = 3, 4, 6, 10
    x = torch.randn(units, 5, inp, generator=g, requires_grad=True)
    base = torch.randn(out, inp, generator=g, requires_grad=True)
    deltas = torch.randn(n, out, inp, generator=g, requires_grad=True)
    scores = torch.softmax(torch.randn(units, n, generator=g), -1).requires_grad_()
    bb, db = (torch.randn(out, generator=g, requires_grad=True), torch.randn(n, out, generator=g, requires_grad=True))
    bias_pair = (bb, db) if bias else (None, None)
    grad_y = torch.randn(units, 5, out, generator=g)
    leaves = [x, base, deltas, scores, *([bb, db] if bias else [])]

    with torch.autocast("cpu", dtype=torch.bfloat16), _Shapes() as seen:
        y = merged_linear(x, base, deltas, scores, 0.8, *bias_pair)
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad(y.float(), leaves, grad_y)
    assert (units, out, inp) not in seen.sizes, "every unit's full merged weight was built"

    w = merge_flat(base, deltas, scores, 0.8).bfloat16()
    want_y = torch.bmm(x.bfloat16(), w.transpose(1, 2))
    if bias:
        want_y = want_y + merge_flat(bb, db, scores, 0.8).bfloat16().unsqueeze(1)
    want = torch.autograd.grad(want_y.float(), leaves, grad_y)
    torch.testing.assert_close(y.float(), want_y.float(), rtol=1.6e-2, atol=1e-2)  # a bf16 rounding
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)
