"""What a model family tells the upcycler: its FFN linears ("sites") and its routing contexts."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from camex.moe.units import RoutingContext, Unit, masked_mean


@dataclass
class Site:
    """One dense FFN linear to replace: `getattr(parent, attr)`."""

    parent: nn.Module
    attr: str
    stack: str  # which stack of blocks it sits in ("encoder", "decoder", "blocks", ...)
    block: int  # block index inside that stack
    role: str  # position inside the FFN ("wi", "wo", "fc1", ...); EP chains link equal roles
    context: RoutingContext
    unit: Unit  # the family's routing unit for merged layers
    router_in: int | None = None  # router input width when it differs from the linear's input

    @property
    def linear(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    def dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """`(weight [O, I], bias or None, transposed)`; GPT-2's Conv1D stores `[I, O]`."""
        lin = self.linear
        if isinstance(lin, nn.Linear):
            return lin.weight, lin.bias, False
        if type(lin).__name__ == "Conv1D":
            return lin.weight.t(), lin.bias, True
        raise TypeError(f"{self.stack}.{self.block}.{self.role}: cannot upcycle a {type(lin).__name__}")


@dataclass
class Plan:
    family: str
    sites: list[Site]
    mask_hooks: list[tuple[nn.Module, RoutingContext]] = field(default_factory=list)
    memory_hooks: list[tuple[nn.Module, RoutingContext]] = field(default_factory=list)


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


def _as_token_mask(mask) -> torch.Tensor | None:
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _fill_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module.camex_context.token_mask = _as_token_mask(_bound(module, args, kwargs).get("attention_mask"))


def _fill_mask_and_memory(module: nn.Module, args: tuple, kwargs: dict) -> None:
    context, bound = module.camex_context, _bound(module, args, kwargs)
    context.token_mask = _as_token_mask(bound.get("attention_mask"))
    memory = bound.get("encoder_hidden_states")
    if memory is not None:
        enc_mask = _as_token_mask(bound.get("encoder_attention_mask"))
        context.memory = masked_mean(memory, None if module.camex_padding_mean == "include" else enc_mask, 1)


def _clear(module: nn.Module, args: tuple, output) -> None:
    module.camex_context.clear()


def install_context_hooks(plan: Plan, *, padding_mean: str) -> None:
    """Fill each routing context from its stack's forward arguments, and clear it after.

    The context hangs on the stack module itself and the hooks are plain functions, so a deep
    copy of the model gets its own contexts wired to its own routers.
    """
    for hooks, fill in ((plan.mask_hooks, _fill_mask), (plan.memory_hooks, _fill_mask_and_memory)):
        for module, context in hooks:
            module.camex_context = context
            module.camex_padding_mean = padding_mean
            module.register_forward_pre_hook(fill, with_kwargs=True)
            module.register_forward_hook(_clear)
