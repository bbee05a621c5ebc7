"""Parameter and FLOP accounting of dense, SMoE, static-merging, CAMEx and EP-CAMEx linears.

Pure functions of a layer shape and the merge settings, for the report's efficiency table
(SPEC §7, §9), plus `count_parameters`, which sorts the parameters of a real (upcycled) model
by layer type.

Conventions. One multiply-add is 2 FLOPs, an elementwise add or scale 1. Figures are forward
FLOPs per token; `train_flops_per_token` is the usual 3× (the backward pass costs about twice the
forward). Work that depends on parameters only (domain vectors, the curvature transform, the
EP-CAMEx base update) runs once per forward pass and is spread over the `tokens_per_batch` tokens
of that pass; with the eval cache (`cached=True`) it is not repeated at all. Merged weights are
built once per routed unit of `tokens_per_unit` tokens. Masks (TIES signs, DARE draws) are a few
elementwise passes over the domain vectors and are left out; so are activations and norms, which
every variant shares.

Kinds: `dense`; `smoe` (token top-k of n + 1 experts); `merged` (static merging: Domain-specific,
Ties, Dare); `camex` (static merging with the curvature operator); `ep_camex` (a chain of
`chain_length` CAMEx linears sharing one propagated base expert).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from camex.merging.curvature import nearest_factors

KINDS = ("dense", "smoe", "merged", "camex", "ep_camex")
MATMUL_TERMS = ("linear", "gate", "merge", "curvature", "experts")  # what torch's FlopCounterMode counts


@dataclass(frozen=True)
class Linear:
    """A linear `in_features → out_features`, with or without a bias."""

    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weight_size(self) -> int:
        return self.in_features * self.out_features

    @property
    def size(self) -> int:
        return self.weight_size + (self.out_features if self.bias else 0)


def _check(kind: str, n: int, rank: int, top_k: int, chain_length: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {list(KINDS)}")
    if n < 1 or rank < 1 or top_k < 1 or chain_length < 1:
        raise ValueError("n, rank, top_k and chain_length must be >= 1")
    if kind == "smoe" and top_k > n + 1:
        raise ValueError(f"top_k={top_k} exceeds the n + 1 = {n + 1} experts of an SMoE layer")
    if kind != "ep_camex" and chain_length != 1:
        raise ValueError("chain_length applies to ep_camex only")


def gate_parameters(in_features: int, experts: int) -> int:
    """A noisy top-k gate: `W_g` and `W_noise`, each `[in, experts]`."""
    return 2 * in_features * experts


def curvature_parameters(layer: Linear, n: int, rank: int) -> int:
    """Kronecker factors `[r, n, d, d]` for the four weight modes, and two bias modes if any."""
    o1, o2 = nearest_factors(layer.out_features)
    i1, i2 = nearest_factors(layer.in_features)
    weight = rank * n * (o1 * o1 + o2 * o2 + i1 * i1 + i2 * i2)
    return weight + (rank * n * (o1 * o1 + o2 * o2) if layer.bias else 0)


def parameters(
    kind: str, layer: Linear, *, n: int = 7, rank: int = 1, top_k: int = 2, chain_length: int = 1
) -> dict[str, int]:
    """Stored parameters of `chain_length` linears of one kind (1 except for EP-CAMEx).

    Returns a breakdown (`experts`, `base`, `gate`, `curvature`) with its `total`, and `active`:
    the weight entries one token is multiplied with (k experts for SMoE, one merged weight
    otherwise), per linear.
    """
    _check(kind, n, rank, top_k, chain_length)
    out: dict[str, int] = {"experts": 0, "base": 0, "gate": 0, "curvature": 0}
    if kind == "dense":
        out["experts"] = layer.size
    elif kind == "smoe":
        out["experts"] = (n + 1) * layer.size
        out["gate"] = gate_parameters(layer.in_features, n + 1)
    else:
        out["experts"] = chain_length * n * layer.size
        out["base"] = layer.size  # EP-CAMEx: only the first layer of a chain stores one
        if kind != "ep_camex":
            out["base"] *= chain_length
        out["gate"] = chain_length * gate_parameters(layer.in_features, n)
        if kind in ("camex", "ep_camex"):
            out["curvature"] = chain_length * curvature_parameters(layer, n, rank)
    out["total"] = sum(out.values())
    out["active"] = (top_k if kind == "smoe" else 1) * layer.size
    return out


def flops_per_token(
    kind: str,
    layer: Linear,
    *,
    n: int = 7,
    rank: int = 1,
    top_k: int = 2,
    tokens_per_unit: int = 128,
    tokens_per_batch: int = 2048,
    chain_length: int = 1,
    training: bool = False,
    noisy: bool = True,
    cached: bool = False,
) -> dict[str, float]:
    """Forward FLOPs per token of `chain_length` linears of one kind, by term, with `total`.

    Terms: `linear` (the token's matmul with its weight), `bias`, `experts` and `combine` (SMoE),
    `pool` (mean of the unit's inputs for the router), `gate` (router logits; the noise logits too
    when `training and noisy`), `merge` (`Ŵ = E_m + α Σ s_i γ̃_i` per unit), `domain_vectors`
    (`τ = E − E_m`), `curvature` (`Σ_ρ` of four mode products per expert) and `ep_base` (the
    EP-CAMEx base update, for every layer of the chain but the last).
    """
    _check(kind, n, rank, top_k, chain_length)
    if tokens_per_unit < 1 or tokens_per_batch < 1:
        raise ValueError("tokens_per_unit and tokens_per_batch must be >= 1")
    o, i = layer.out_features, layer.in_features
    b = 1 if layer.bias else 0
    terms: dict[str, float] = {}
    if kind == "dense":
        terms["linear"] = 2.0 * o * i
        terms["bias"] = float(b * o)
    elif kind == "smoe":
        e = n + 1
        terms["gate"] = 2.0 * i * e * (2 if training and noisy else 1)
        terms["experts"] = top_k * 2.0 * o * i
        terms["bias"] = float(top_k * b * o)
        terms["combine"] = 2.0 * top_k * o  # scale each expert's output, add them up
    else:
        per_pass = 0.0 if cached else 1.0 / tokens_per_batch
        per_unit = 1.0 / tokens_per_unit
        terms["linear"] = 2.0 * o * i
        terms["bias"] = float(b * o)
        terms["pool"] = float(i)
        terms["gate"] = 2.0 * i * n * (2 if training and noisy else 1) * per_unit
        terms["merge"] = 2.0 * n * (o * i + b * o) * per_unit
        terms["domain_vectors"] = n * (o * i + b * o) * per_pass
        if kind in ("camex", "ep_camex"):
            o1, o2 = nearest_factors(o)
            i1, i2 = nearest_factors(i)
            weight = 2.0 * rank * n * o * i * (o1 + o2 + i1 + i2)
            bias = 2.0 * rank * n * o * (o1 + o2) * b
            terms["curvature"] = (weight + bias) * per_pass  # the r terms are summed inside the GEMMs
        terms = {k: v * chain_length for k, v in terms.items()}
        if kind == "ep_camex":
            # E_m ← E_m + (β/n) Σ_i M_i(τ_i): n − 1 adds to sum, one scale, one add, per entry
            terms["ep_base"] = (chain_length - 1) * (n + 1) * (o * i + b * o) * per_pass
    terms["total"] = sum(terms.values())
    return terms


def train_flops_per_token(kind: str, layer: Linear, **kwargs) -> float:
    """Forward + backward ≈ 3 × forward FLOPs per token (the usual convention)."""
    return 3.0 * flops_per_token(kind, layer, training=True, **kwargs)["total"]


def efficiency_table(
    layer: Linear,
    *,
    n: int = 7,
    rank: int = 1,
    top_k: int = 2,
    tokens_per_unit: int = 128,
    tokens_per_batch: int = 2048,
    chain_length: int = 12,
) -> list[dict]:
    """One row per kind, per linear (EP-CAMEx averaged over its chain): parameters, active
    parameters, forward FLOPs per token in training and in cached evaluation."""
    rows = []
    for kind in KINDS:
        length = chain_length if kind == "ep_camex" else 1
        p = parameters(kind, layer, n=n, rank=rank, top_k=top_k, chain_length=length)
        common = dict(n=n, rank=rank, top_k=top_k, tokens_per_unit=tokens_per_unit, tokens_per_batch=tokens_per_batch)
        train = flops_per_token(kind, layer, chain_length=length, training=True, **common)["total"]
        evals = flops_per_token(kind, layer, chain_length=length, cached=True, **common)["total"]
        rows.append(
            {
                "kind": kind,
                "parameters": p["total"] / length,
                "active_parameters": p["active"],
                "train_forward_flops_per_token": train / length,
                "eval_flops_per_token": evals / length,
                "x_dense_parameters": None,
                "x_dense_flops": None,
            }
        )
    dense = rows[0]
    for row in rows:
        row["x_dense_parameters"] = row["parameters"] / dense["parameters"]
        row["x_dense_flops"] = row["train_forward_flops_per_token"] / dense["train_forward_flops_per_token"]
    return rows


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters of a model by layer type, each counted once.

    `merged_experts`, `merged_base` (routed and base experts of merged-expert linears),
    `curvature` (Kronecker factors), `router` (gates), `smoe_experts`, `other` (everything else:
    embeddings, attention, norms, heads, dense FFNs), and `total`.
    """
    from camex.moe import KroneckerCurvature, MergedExpertLinear, NoisyTopKGate, TokenMoELinear

    counts = dict.fromkeys(("merged_experts", "merged_base", "curvature", "router", "smoe_experts", "other"), 0)
    seen: set[int] = set()

    def add(key: str, params) -> None:
        for p in params:
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                counts[key] += p.numel()

    for m in model.modules():
        if isinstance(m, MergedExpertLinear):
            add("merged_experts", [m.expert_weight, m.expert_bias])
            add("merged_base", [m.base_weight, m.base_bias])
        elif isinstance(m, TokenMoELinear):
            add("smoe_experts", [m.expert_weight, m.expert_bias])
        elif isinstance(m, KroneckerCurvature):
            add("curvature", m.parameters())
        elif isinstance(m, NoisyTopKGate):
            add("router", m.parameters())
    add("other", model.parameters())
    counts["total"] = sum(counts.values())
    return counts
