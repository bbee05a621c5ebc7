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

import ctypes
import ctypes.util
import sys
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


# Large outputs (a curved `γ̃`, an expert gradient: `[n, O, I]`) cannot be reused across calls,
# but their first touch can fault in 2 MiB pages instead of 4 KiB ones: a fresh 66 MiB tensor
# filled once took 40 ms of CPU time with 4 KiB pages and 8 ms after madvise(MADV_HUGEPAGE) on the
# project's VM (transparent huge pages in `madvise` mode, the common default). PyTorch does the
# same for every allocation under THP_MEM_ALLOC_ENABLE=1; here only for these few tensors.
HUGE_PAGE_BYTES = 4 * 2**20  # tensors at least this large get the advice
_MADV_HUGEPAGE = 14
_PAGE = 4096
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _libc = libc
            except (OSError, AttributeError):
                _libc = False
    return _libc or None


def empty_like(t: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """`torch.empty` shaped like `t` (or `shape`), in `t`'s dtype and device; on Linux CPUs a large
    one is advised to fault in huge pages (a hint: the values and layout are those of torch.empty)."""
    out = t.new_empty(t.shape if shape is None else shape)
    nbytes = out.numel() * out.element_size()
    libc = _madvise() if out.device.type == "cpu" and nbytes >= HUGE_PAGE_BYTES else None
    if libc is not None:
        start = (out.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
        end = (out.data_ptr() + nbytes) & ~(_PAGE - 1)
        if end > start:
            libc.madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out
