"""Reused CPU work buffers for the hand-written passes (curvature blocks, merged-linear tiles).

A fresh CPU tensor of a few MiB or more is mapped from the system and page-faulted on first
touch, on every call (glibc hands large blocks back on free): on a virtual machine that costs
about as much as 10-20 passes over the same memory (9 ms against 0.3 ms for 9 MiB, measured on
the project's 2-core VM). The passes' block- and tile-sized buffers never leave the pass that
fills them, so each thread keeps one per name and hands it out again. Buffers that leave a pass
(outputs, tensors saved for backward) are never taken from here. Off the CPU the caching
allocator already recycles memory, so `buffer` returns fresh memory there.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def buffer(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of `numel` entries of `like`'s dtype on its device, reused per thread by
    `name` on the CPU. The caller must be done with it before it asks for the same name again."""
    if like.device.type != "cpu":
        return like.new_empty(numel)
    store = getattr(_local, "buffers", None)
    if store is None:
        store = _local.buffers = {}
    key = (name, like.dtype)
    held = store.get(key)
    if held is None or held.numel() < numel:
        held = store[key] = like.new_empty(numel)
    return held[:numel]


def release() -> None:
    """Drop this thread's buffers (their memory goes back to the allocator)."""
    _local.buffers = {}


def graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph for another one (unknown: assume so):
    a pass may write a gradient over a saved tensor or an incoming gradient only where it is not."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:
        return True
