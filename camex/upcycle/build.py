"""Replace each planned FFN linear with the MoE layer a merge variant asks for (SPEC §6)."""

from __future__ import annotations

from itertools import groupby

from torch import nn

from camex.moe import (
    ExpertChain,
    KroneckerCurvature,
    MergedExpertLinear,
    NoisyTopKGate,
    SharedRouting,
    TokenMoELinear,
    UnitRouter,
    attach_aux_loss,
    build_mask,
)
from camex.upcycle.sites import Plan, Site, install_context_hooks
from camex.variants import MergeVariant, MoEOptions


def _unit(site: Site, variant: MergeVariant, options: MoEOptions) -> str:
    if variant.layer == "smoe":
        if options.routing not in ("auto", "token"):
            raise ValueError(f"merge.routing={options.routing!r}: smoe routes tokens; allowed: ['auto', 'token']")
        return "token"
    if options.routing == "token":
        raise ValueError(
            f"merge.routing='token' needs merge=smoe; {variant.name} merges one weight per "
            "sequence or segment; allowed: ['auto', 'sequence', 'segment']"
        )
    if options.routing == "auto" or site.unit == "memory":
        return site.unit
    return options.routing


def _router(site: Site, unit: str, in_features: int, experts: int, top_k: int, options: MoEOptions) -> UnitRouter:
    gate = NoisyTopKGate(
        in_features=site.router_in if unit == "memory" else in_features,
        num_experts=experts,
        top_k=top_k,
        noisy=options.noisy,
        aux_coef=options.aux_coef,
    )
    return UnitRouter(
        gate=gate,
        unit=unit,
        context=site.context,
        padding_mean=options.padding_mean,
        segment_len=options.segment_len,
        first_segment=options.first_segment,
    )


def _select(sites: list[Site], layers: tuple[int, ...] | None) -> list[Site]:
    if layers is None:
        return sites
    blocks = sorted({s.block for s in sites})
    bad = sorted(set(layers) - set(blocks))
    if bad:
        raise ValueError(f"merge.layers has blocks {bad} the model lacks; allowed: {blocks[0]}..{blocks[-1]}")
    return [s for s in sites if s.block in layers]


def _ep_heads(sites: list[Site]) -> tuple[set[int], list[list[int]]]:
    """Chains of consecutive blocks with the same (stack, role) and shape; returns the indices
    of sites that head a chain (and so store a base) and the chains as lists of site indices."""
    order = sorted(range(len(sites)), key=lambda i: (sites[i].stack, sites[i].role, sites[i].block))
    chains: list[list[int]] = []
    for _, group in groupby(order, key=lambda i: (sites[i].stack, sites[i].role)):
        for i in group:
            prev = chains[-1][-1] if chains else None
            same = (
                prev is not None
                and (sites[prev].stack, sites[prev].role) == (sites[i].stack, sites[i].role)
                and sites[prev].block + 1 == sites[i].block
                and sites[prev].dense_weight()[0].shape == sites[i].dense_weight()[0].shape
            )
            if same:
                chains[-1].append(i)
            else:
                chains.append([i])
    return {c[0] for c in chains}, chains


def build_layers(plan: Plan, variant: MergeVariant, options: MoEOptions) -> list[nn.Module]:
    sites = _select(plan.sites, options.layers)
    n = options.num_experts
    experts = n + 1 if variant.layer == "smoe" else n
    top_k = options.top_k or (2 if variant.layer == "smoe" else n)
    if top_k > experts:
        raise ValueError(f"merge.top_k={top_k} exceeds the {experts} experts of {variant.name}; allowed: 1..{experts}")
    heads, chains = _ep_heads(sites) if variant.layer == "ep" else (set(range(len(sites))), [])
    shared_by_block: dict[tuple[str, int], SharedRouting] = {}
    layers: list[nn.Module] = []
    for i, site in enumerate(sites):
        weight, bias, _ = site.dense_weight()
        out_features, in_features = weight.shape
        unit = _unit(site, variant, options)
        router, shared = _router(site, unit, in_features, experts, top_k, options), None
        if options.router_scope == "block":
            key = (site.stack, site.block)
            if key in shared_by_block:
                router, shared = None, shared_by_block[key]
            else:
                shared = shared_by_block[key] = SharedRouting()
        common = dict(in_features=in_features, out_features=out_features, num_experts=experts, bias=bias is not None)
        if variant.layer == "smoe":
            layer = TokenMoELinear(**common, router=router, shared=shared)
        else:
            curvature = None
            if variant.curvature:
                curvature = KroneckerCurvature(
                    num_experts=n,
                    rank=options.rank,
                    out_features=out_features,
                    in_features=in_features,
                    bias=bias is not None,
                )
            mask = build_mask(
                variant.mask,
                ties_trim=options.ties_trim,
                dare_p=options.dare_p,
                dare_granularity=options.dare_granularity,
            )
            layer = MergedExpertLinear(
                **common,
                router=router,
                shared=shared,
                mask=mask,
                curvature=curvature,
                alpha=options.alpha,
                mask_order=options.mask_order,
                store_base=i in heads,
            )
        layer.to(device=weight.device, dtype=weight.dtype)
        layer.load_dense(weight.detach(), None if bias is None else bias.detach())
        layers.append(layer)
    for chain in chains:
        ExpertChain([layers[i] for i in chain], beta=options.ep_beta).start_from_dense()
    for site, layer in zip(sites, layers):
        setattr(site.parent, site.attr, layer)
    return layers


def apply_plan(model: nn.Module, plan: Plan, variant: MergeVariant, options: MoEOptions) -> nn.Module:
    if not plan.sites:
        raise ValueError(f"found no FFN linears to upcycle in {type(model).__name__}")
    build_layers(plan, variant, options)
    install_context_hooks(plan, padding_mean=options.padding_mean)
    attach_aux_loss(model)
    return model
