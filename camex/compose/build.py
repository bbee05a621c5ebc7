"""Build one MoE from a base dense model and several fine-tunes of it (MERGEME.md §1-2).

Every block's FFN linear of each expert becomes one expert of that block's MoE layer (built by
`camex.upcycle`, so every merge variant applies unchanged); the base FFN is the base expert `E_m`
of merged-expert variants, or the last of `n + 1` experts for token top-k SMoE. All other weights
exist once, merged from the sources by `camex.compose.shared`.

Order of work: index every checkpoint (headers only), check every expert against the base, then
build the layers and stream the tensors in one at a time. Nothing is copied before all checks pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from camex.compose.routers import RouterInit, initialise
from camex.compose.shared import SharedMerge, merge_task_vectors
from camex.compose.sources import Checkpoint, ComposeError, open_checkpoint
from camex.moe import KroneckerCurvature, MergedExpertLinear, TokenMoELinear, UnitRouter
from camex.upcycle import plan_for
from camex.upcycle.build import apply_plan
from camex.variants import MergeVariant, MoEOptions, get_variant

MOE_TYPES = (MergedExpertLinear, TokenMoELinear)


@dataclass
class Composition:
    """What a composed model was built from; saved with it and shown in its model card."""

    base: str
    experts: dict[str, str]
    variant: str
    options: dict
    shared: dict
    router: dict
    seed: int
    architecture: str
    initialised: list[str] = field(default_factory=list)  # tensors no source holds (kept at init)

    @property
    def domains(self) -> list[str]:
        return list(self.experts)


def _file_key(name: str, ckpt: Checkpoint, prefix: str) -> str | None:
    """The checkpoint key of model tensor `name` (checkpoints of a bare base model lack the
    head model's prefix, e.g. `bert.`; those of a head model have it)."""
    for key in (name, name.removeprefix(prefix), prefix + name):
        if key in ckpt.tensors:
            return key
    return None


def _shared_parameters(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each non-MoE parameter once, with all the names it goes by (tied weights have several)."""
    skip = (*MOE_TYPES, UnitRouter, KroneckerCurvature)
    owned: set[int] = set()
    for m in model.modules():
        if isinstance(m, skip):
            owned.update(id(p) for p in m.parameters())
    names: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in owned:
            names.setdefault(id(p), ([], p))[0].append(name)
    return list(names.values())


def _shape_error(ckpt: Checkpoint, key: str, have, want, base: Checkpoint) -> ComposeError:
    return ComposeError(
        f"{ckpt.label}={ckpt.ref}: tensor {key} has shape {list(have)} where the base "
        f"({base.ref}) has {list(want)}; experts must share the base's architecture"
    )


def _check_expert(ckpt: Checkpoint, base: Checkpoint, needed: dict[str, tuple[int, ...]], prefix: str) -> None:
    """`needed`: this expert's key -> the shape the composed model reads. A tensor the model does
    not read and the base lacks (under either naming) means another depth or layout."""
    b_type, e_type = base.config.get("model_type"), ckpt.config.get("model_type")
    if b_type and e_type and b_type != e_type:
        raise ComposeError(f"{ckpt.label}={ckpt.ref}: model_type {e_type!r} differs from the base's {b_type!r}")
    for key, shape in needed.items():
        if key not in ckpt.tensors:
            raise ComposeError(f"{ckpt.label}={ckpt.ref}: tensor {key} is missing (the base {base.ref} has it)")
        if ckpt.tensors[key][1] != shape:
            raise _shape_error(ckpt, key, ckpt.tensors[key][1], shape, base)
    known = {k.removeprefix(prefix) for k in base.tensors}
    extra = sorted(k for k in ckpt.tensors if k not in needed and k.removeprefix(prefix) not in known)
    if extra:
        raise ComposeError(f"{ckpt.label}={ckpt.ref}: tensor {extra[0]} is not in the base ({base.ref}) or the model")


def _sites(model: nn.Module, options: MoEOptions):
    """`(site, weight key, bias key, transposed)` per FFN linear, keys in the model's naming, before upcycling."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for site in plan_for(model, options).sites:
        stem = f"{names[id(site.parent)]}.{site.attr}".lstrip(".")
        _, bias, transposed = site.dense_weight()  # GPT-2's Conv1D stores [in, out]
        out.append((site, f"{stem}.weight", None if bias is None else f"{stem}.bias", transposed))
    return out


def compose_into(
    model: nn.Module,
    base: str,
    experts: Mapping[str, str],
    *,
    variant: str | MergeVariant = "domain",
    options: MoEOptions | None = None,
    shared: SharedMerge | None = None,
    router: RouterInit | None = None,
    tokenizer=None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Turn `model` (the base's architecture, any weights) into the MoE composed from `experts`
    (`{domain: source}`) around `base`; returns it. See the module doc."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    if variant.layer == "dense":
        raise ComposeError("compose needs an MoE merge variant; merge=dense has no experts")
    if not experts:
        raise ComposeError("compose.experts is empty; allowed: a mapping {domain: checkpoint}")
    shared, router = shared or SharedMerge(), router or RouterInit()
    options = (options or MoEOptions()).replace(num_experts=len(experts))
    domains = list(experts)
    if router.init in ("centroid", "cheap_embed") and (prompts is None or set(prompts) != set(domains)):
        raise ComposeError(f"compose.router.init={router.init} needs prompts for exactly the domains {domains}")

    base_ck = open_checkpoint(base, "compose.base")
    expert_cks = [open_checkpoint(ref, f"compose.experts.{d}") for d, ref in experts.items()]
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    try:
        sites = _sites(model, options)
    except ValueError as e:
        raise ComposeError(str(e)) from None

    # where each tensor is in each source ([base, *experts]; a source may name it with or without the
    # head model's prefix), and what every expert must hold: checked before anything is copied
    sources = [base_ck, *expert_cks]

    def keys_of(aliases: list[str]) -> list[str | None]:
        return [next((k for k in (_file_key(a, ck, prefix) for a in aliases) if k), None) for ck in sources]

    ffn: dict[str, list[str | None]] = {}
    for _, wkey, bkey, _ in sites:
        for name in filter(None, (wkey, bkey)):
            ffn[name] = keys_of([name])
            if ffn[name][0] is None:
                raise ComposeError(f"compose.base={base}: tensor {name} (an FFN linear) is missing")
    torch.manual_seed(seed)  # the random routers and any tensor no source holds
    try:
        apply_plan(model, plan_for(model, options), variant, options)
    except ValueError as e:
        raise ComposeError(str(e)) from None
    moe = [(getattr(s.parent, s.attr), w, b, t) for s, w, b, t in sites]
    moe = [m for m in moe if isinstance(m[0], MOE_TYPES)]  # merge.layers may leave some dense
    plan_shared, initialised = [], []
    for aliases, p in _shared_parameters(model):
        keys = keys_of(aliases)
        if all(k is None for k in keys):
            initialised.append(aliases[0])
        else:
            plan_shared.append((aliases[0], p, keys))
    needed: list[dict[str, tuple[int, ...]]] = [{} for _ in expert_cks]
    for name, p, keys in plan_shared:
        if keys[0] is not None and base_ck.tensors[keys[0]][1] != tuple(p.shape):
            raise _shape_error(base_ck, keys[0], base_ck.tensors[keys[0]][1], tuple(p.shape), base_ck)
        for i, key in enumerate(keys[1:]):
            if key is None:
                who = "the base has it" if keys[0] else "other experts have it"
                raise ComposeError(f"{expert_cks[i].label}={expert_cks[i].ref}: tensor {name} is missing ({who})")
            needed[i][key] = tuple(p.shape)
    for name, keys in ffn.items():
        for i, key in enumerate(keys[1:]):
            if key is None:
                raise ComposeError(
                    f"{expert_cks[i].label}={expert_cks[i].ref}: tensor {name} is missing (the base has it)"
                )
            needed[i][key] = base_ck.tensors[keys[0]][1]
    for i, ck in enumerate(expert_cks):
        _check_expert(ck, base_ck, needed[i], prefix)

    _fill_experts(moe, base_ck, expert_cks, ffn, n=len(experts))
    _merge_shared(plan_shared, base_ck, expert_cks, shared, seed)
    if router.init in ("centroid", "cheap_embed") and tokenizer is None:
        tokenizer = load_tokenizer(base_ck)
    try:
        initialise(
            model, router, tokenizer=tokenizer, prompts=None if prompts is None else {d: prompts[d] for d in domains}
        )
    except ValueError as e:
        raise ComposeError(str(e)) from None
    model.camex_composition = Composition(
        base=str(base), experts={d: str(r) for d, r in experts.items()}, variant=variant.name,
        options={k: (list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()},
        shared=shared.as_dict(), router=router.as_dict(), seed=seed, architecture=type(model).__name__,
        initialised=initialised,
    )  # fmt: skip
    return model


@torch.no_grad()
def _fill_experts(moe, base_ck: Checkpoint, expert_cks: list[Checkpoint], keys: dict[str, list], n: int) -> None:
    """Expert `i` of every MoE layer from expert checkpoint `i`; the base FFN as `E_m` (merged
    variants) or as expert `n` (SMoE). One tensor in memory at a time."""
    for layer, wkey, bkey, conv in moe:
        # (slot, checkpoint, its index in keys): experts 0..n-1, then the base as expert n for SMoE
        slots = [(i, ck, i + 1) for i, ck in enumerate(expert_cks)]
        if isinstance(layer, TokenMoELinear):
            slots.append((n, base_ck, 0))
        for slot, ck, j in slots:
            w = ck.read(keys[wkey][j])
            layer.expert_weight[slot].copy_(w.t() if conv else w)
            if bkey is not None:
                layer.expert_bias[slot].copy_(ck.read(keys[bkey][j]))
        if isinstance(layer, MergedExpertLinear) and layer.base_weight is not None:
            w = base_ck.read(keys[wkey][0])
            layer.base_weight.copy_(w.t() if conv else w)
            if bkey is not None:
                layer.base_bias.copy_(base_ck.read(keys[bkey][0]))


@torch.no_grad()
def _merge_shared(plan, base_ck: Checkpoint, expert_cks: list[Checkpoint], spec: SharedMerge, seed: int) -> None:
    """Each shared tensor merged from the base and the experts, read one tensor at a time. A
    tensor the base lacks (e.g. a task head the experts added) is the experts' mean."""
    generator = torch.Generator().manual_seed(seed)
    for _, p, (key, *where) in plan:
        if key is None:
            p.copy_(torch.stack([ck.read(w).float() for ck, w in zip(expert_cks, where)]).mean(0))
            continue
        theta = base_ck.read(key).float()
        taus = torch.stack([ck.read(w).float() - theta for ck, w in zip(expert_cks, where)])
        p.copy_(merge_task_vectors(theta, taus, spec, generator=generator))


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(ckpt: Checkpoint, architecture: str | None):
    import transformers

    name = architecture or (ckpt.config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ComposeError(f"compose.architecture={name!r}: not a transformers model class; e.g. BertModel")
    return cls


def compose(
    base: str,
    experts: Mapping[str, str],
    *,
    shared: SharedMerge | str | None = None,
    router: RouterInit | str | None = None,
    variant: str | MergeVariant = "domain",
    options: MoEOptions | None = None,
    architecture: str | None = None,
    config_overrides: Mapping | None = None,
    tokenizer=None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> nn.Module:
    """`camex.compose(base, experts={domain: source}, shared="ties", router="centroid", ...)`.

    The model class is the base's (`config.json` `architectures`) unless `architecture` names
    another (e.g. a head class); its weights come from the sources only.
    """
    from transformers import AutoConfig

    shared = SharedMerge(shared) if isinstance(shared, str) else shared
    router = RouterInit(router) if isinstance(router, str) else router
    base_ck = open_checkpoint(base, "compose.base")
    config = AutoConfig.from_pretrained(str(base_ck.path), **dict(config_overrides or {}))
    cls = model_class(base_ck, architecture)
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    return compose_into(
        model, base, experts, variant=variant, options=options, shared=shared, router=router,
        tokenizer=tokenizer, prompts=prompts, seed=seed,
    )  # fmt: skip
