"""Collects the load-balancing losses of all gates once per model forward (SPEC §5).

`attach_aux_loss(model)` adds the summed auxiliary loss to `output.loss` in training (never in
eval) and leaves it on `model.camex_aux_loss` for logging, or for loops whose model returns no
loss (timm) to add themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from camex.moe.gate import NoisyTopKGate


def gates(model: nn.Module) -> list[NoisyTopKGate]:
    return [m for m in model.modules() if isinstance(m, NoisyTopKGate)]


def pop_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum and reset the pending auxiliary losses of every gate in `model`."""
    total = None
    for gate in gates(model):
        aux = gate.pop_aux()
        if aux is not None:
            total = aux if total is None else total + aux
    return total


def attach_aux_loss(model: nn.Module) -> None:
    model.camex_aux_loss = None

    def before(module, args, kwargs):
        pop_aux_loss(module)  # drop anything left by an interrupted pass

    def after(module, args, kwargs, output):
        aux = pop_aux_loss(module)
        module.camex_aux_loss = aux
        loss = getattr(output, "loss", None) if not isinstance(output, tuple) else None
        if module.training and aux is not None and loss is not None:
            output.loss = loss + aux.to(loss.dtype)
        return output

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
