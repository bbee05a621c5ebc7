"""Merge variants as data: each row of SPEC §8 is a configured `MergeVariant`, found by name.

A variant says *what* replaces a dense FFN linear; `MoEOptions` says *how* (sizes, routing,
mask and curvature settings). Both are plain frozen dataclasses so configs can build them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

Layer = Literal["dense", "smoe", "merged", "ep"]
Mask = Literal["none", "ties", "dare"]


@dataclass(frozen=True)
class MergeVariant:
    name: str
    layer: Layer
    mask: Mask = "none"
    curvature: bool = False
    description: str = ""


VARIANTS: dict[str, MergeVariant] = {
    v.name: v
    for v in (
        MergeVariant("dense", "dense", description="the dense model, no MoE"),
        MergeVariant("smoe", "smoe", description="SMoE: token top-k of n+1 upcycled experts"),
        MergeVariant("domain", "merged", description="Domain-specific: Euclidean merging"),
        MergeVariant("camex", "merged", curvature=True, description="Domain-specific-CA"),
        MergeVariant("ties", "merged", mask="ties", description="Ties: Euclidean, TIES mask"),
        MergeVariant("camex_ties", "merged", "ties", True, "Ties-CA"),
        MergeVariant("dare", "merged", mask="dare", description="Dare: Euclidean, DARE mask"),
        MergeVariant("camex_dare", "merged", "dare", True, "Dare-CA"),
        MergeVariant("ep_camex", "ep", curvature=True, description="EP-CAMEx: dynamic base chain"),
    )
}


@dataclass(frozen=True)
class MoEOptions:
    """Every knob of an upcycled MoE layer; defaults follow the paper (SPEC §5, Table 8)."""

    num_experts: int = 7  # n routed experts; SMoE uses n + 1
    top_k: int | None = None  # None: n for merging (all experts merged), 2 for SMoE
    rank: int = 1  # Kronecker rank r of the curvature operator
    alpha: float = 1.0
    mask_order: Literal["mask_first", "curvature_first"] = "mask_first"
    ties_trim: float | None = None  # None: released TIES; a fraction: reference TIES trimming
    dare_p: float = 0.1
    dare_granularity: Literal["expert", "element"] = "expert"
    routing: Literal["auto", "sequence", "segment", "token"] = "auto"
    padding_mean: Literal["exclude", "include"] = "exclude"
    segment_len: int = 256
    first_segment: Literal["detach", "uniform"] = "detach"
    router_scope: Literal["linear", "block"] = "linear"
    decoder_routing: Literal["encoder", "self"] = "encoder"
    noisy: bool = True
    aux_coef: float = 0.01
    ep_beta: float = 1.0
    curvature_decay: bool = False  # True: weight-decay the curvature factors, as the released code does
    layers: tuple[int, ...] | None = None  # transformer blocks to upcycle; None = all

    def __post_init__(self) -> None:
        _check_options(self)

    def replace(self, **changes) -> MoEOptions:
        return replace(self, **changes)


_CHOICES = {
    "mask_order": ("mask_first", "curvature_first"),
    "dare_granularity": ("expert", "element"),
    "routing": ("auto", "sequence", "segment", "token"),
    "padding_mean": ("exclude", "include"),
    "first_segment": ("detach", "uniform"),
    "router_scope": ("linear", "block"),
    "decoder_routing": ("encoder", "self"),
}


def _check_options(o: MoEOptions) -> None:
    for key, allowed in _CHOICES.items():
        if getattr(o, key) not in allowed:
            raise ValueError(f"merge.{key}={getattr(o, key)!r} is not one of {list(allowed)}")
    if o.num_experts < 1:
        raise ValueError(f"merge.num_experts must be >= 1, got {o.num_experts}")
    if o.top_k is not None and not 1 <= o.top_k <= o.num_experts + 1:
        raise ValueError(f"merge.top_k must lie in [1, num_experts + 1], got {o.top_k}")
    if o.rank < 1:
        raise ValueError(f"merge.rank must be >= 1, got {o.rank}")
    if not 0.0 <= o.dare_p < 1.0:
        raise ValueError(f"merge.dare_p must lie in [0, 1), got {o.dare_p}")
    if o.ties_trim is not None and not 0.0 <= o.ties_trim < 1.0:
        raise ValueError(f"merge.ties_trim must be null or lie in [0, 1), got {o.ties_trim}")
    if o.segment_len < 1:
        raise ValueError(f"merge.segment_len must be >= 1, got {o.segment_len}")


def option_names() -> list[str]:
    return [f.name for f in fields(MoEOptions)]


def get_variant(name: str) -> MergeVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown merge variant {name!r}; allowed: {sorted(VARIANTS)}") from None


def list_variants() -> list[str]:
    return list(VARIANTS)
