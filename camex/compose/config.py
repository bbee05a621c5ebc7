"""The `compose` config group (conf/compose/): read and checked before any weight is loaded.

An empty `compose.experts` means no composition (the dense model is upcycled as usual).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from camex.compose.hetero import HeteroSpec, check_vocabularies
from camex.compose.heuristic import HeuristicRouting
from camex.compose.routers import RouterInit
from camex.compose.shared import SharedMerge
from camex.compose.sources import ComposeError, open_checkpoint

KEYS = ("base", "experts", "shared", "router", "prompts", "prompts_per_domain", "train_only", "save", "routing",
        "heterogeneous")  # fmt: skip
TRAIN_ONLY = ("full", "router")


@dataclass
class ComposeSpec:
    base: str
    experts: dict[str, str]
    shared: SharedMerge
    router: RouterInit
    prompts: dict[str, str] = field(default_factory=dict)  # domain -> a text file, one prompt per line
    prompts_per_domain: int = 32
    train_only: str = "full"
    save: str | None = None
    routing: HeuristicRouting | None = None  # routing.method set: heuristic routing (docs/heuristic_routing.md)
    heterogeneous: HeteroSpec | None = None  # heterogeneous.enabled: experts of other depth/width (hetero.py)
    vocab_size: int | None = None  # heterogeneous: the experts' shared vocabulary


def _build(cls, section: str, values: Any):
    if not isinstance(values, dict):
        raise ComposeError(f"compose.{section}={values!r} is invalid; allowed: a mapping")
    try:
        return cls(**values)
    except TypeError as e:
        raise ComposeError(f"compose.{section}: {e}; allowed keys: {list(cls.__dataclass_fields__)}") from None
    except ValueError as e:
        raise ComposeError(str(e)) from None


def parse(cfg: dict[str, Any] | None, *, default_base: str | None) -> ComposeSpec | None:
    """The composition a run asks for, or None; every source's headers are read here, so a bad
    source stops the run before its data or model are loaded."""
    if not cfg or not cfg.get("experts"):
        return None
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ComposeError(f"compose.{unknown[0]} is not an option; allowed: {list(KEYS)}")
    experts = cfg["experts"]
    if not isinstance(experts, dict) or not all(isinstance(v, str) and v for v in experts.values()):
        raise ComposeError(f"compose.experts={experts!r} is invalid; allowed: a mapping {{domain: checkpoint}}")
    hetero = _build(HeteroSpec, "heterogeneous", cfg.get("heterogeneous") or {})
    if hetero.enabled:
        return _heterogeneous(cfg, experts, hetero)
    base = cfg.get("base") or default_base
    if not isinstance(base, str):
        raise ComposeError("compose.base is missing; allowed: a checkpoint (null: model.pretrained)")
    train_only = cfg.get("train_only", "full")
    if train_only not in TRAIN_ONLY:
        raise ComposeError(f"compose.train_only={train_only!r} is not one of {list(TRAIN_ONLY)}")
    router = _build(RouterInit, "router", cfg.get("router") or {})
    if train_only == "router" and router.init == "oracle":
        raise ComposeError("compose.train_only=router needs a router with parameters; router.init=oracle has none")
    k = cfg.get("prompts_per_domain", 32)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ComposeError(f"compose.prompts_per_domain={k!r} is invalid; allowed: an integer >= 1")
    prompts = dict(cfg.get("prompts") or {})
    if router.init in ("centroid", "cheap_embed"):
        missing = [d for d in experts if d not in prompts]
        if missing:
            raise ComposeError(
                f"compose.prompts.{missing[0]} is missing: router.init={router.init} needs prompts per domain "
                "(a text file, one prompt per line, or domain:<name> for a shipped domain)"
            )
    routing = dict(cfg.get("routing") or {})
    routing = _build(HeuristicRouting, "routing", routing) if routing.get("method") else None
    if routing is not None and train_only == "router":
        raise ComposeError("compose.train_only=router needs a router with parameters; compose.routing has none")
    if routing is not None and routing.attention == "separate" and cfg.get("save"):
        raise ComposeError("compose.save is not available with compose.routing.attention=separate; allowed: null")
    spec = ComposeSpec(
        base=base, experts=dict(experts), shared=_build(SharedMerge, "shared", cfg.get("shared") or {}), router=router,
        prompts=prompts, prompts_per_domain=k, train_only=train_only, save=cfg.get("save"), routing=routing,
    )  # fmt: skip
    open_checkpoint(base, "compose.base")
    for d, ref in experts.items():
        open_checkpoint(ref, f"compose.experts.{d}")
    return spec


def _heterogeneous(cfg: dict[str, Any], experts: dict[str, str], hetero: HeteroSpec) -> ComposeSpec:
    """compose.heterogeneous.enabled: the experts alone make the MoE; what only a composition from
    a base means (a merge of shared weights, router inits, heuristic routing, compose.save) is refused."""
    train_only = cfg.get("train_only", "full")
    if train_only not in TRAIN_ONLY:
        raise ComposeError(f"compose.train_only={train_only!r} is not one of {list(TRAIN_ONLY)}")
    router = (cfg.get("router") or {}).get("init", "random")
    if router != "random":
        raise ComposeError(f"compose.router.init={router} is not available with compose.heterogeneous.enabled=true; "
                           "allowed: random (the sequence router starts random)")  # fmt: skip
    if (cfg.get("routing") or {}).get("method"):
        raise ComposeError("compose.routing.method is not available with compose.heterogeneous.enabled=true; "
                           "allowed: null")  # fmt: skip
    if cfg.get("save"):
        raise ComposeError("compose.save is not available with compose.heterogeneous.enabled=true; allowed: null "
                           "(the trained MoE's weights are in <run_dir>/final_model)")  # fmt: skip
    vocab = check_vocabularies({d: open_checkpoint(ref, f"compose.experts.{d}") for d, ref in experts.items()})
    return ComposeSpec(base="", experts=dict(experts), shared=SharedMerge(), router=RouterInit(),
                       train_only=train_only, heterogeneous=hetero, vocab_size=vocab)  # fmt: skip


def train_only_router(model) -> None:
    """Freeze everything but the routers' gates."""
    from camex.compose.routers import routers

    for p in model.parameters():
        p.requires_grad_(False)
    for r in routers(model):
        for p in r.parameters():
            p.requires_grad_(True)
