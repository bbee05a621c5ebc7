"""The merged linear's merge and backward reductions on the CPU in one pass each (`cpu_merge.c`, issue 20).

Built at first use and called through `ctypes` on the tensors' memory (`cpu_build`: where it
cannot be built, or `CAMEX_CPU_KERNELS=0`, `available()` is False and `camex.merging.merge` runs
its PyTorch ops, the reference the tests pin these kernels to). fp32 only, on PyTorch's thread count.
"""

from __future__ import annotations

import ctypes

import torch

from camex.kernels.cpu_build import CompiledLibrary


def _declare(lib: ctypes.CDLL) -> None:
    c_long, c_int, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    lib.camex_merge.argtypes = [c_int, c_int, c_long, ptr, ptr, c_long, ptr, ptr, ptr, c_int]
    lib.camex_merge.restype = None
    lib.camex_merge_grad.argtypes = [c_int, c_int, c_long, ptr, ptr, c_long, ptr, ptr, ptr, ptr, ptr, c_long, ptr,
                                     c_int]  # fmt: skip
    lib.camex_merge_grad.restype = c_int


LIBRARY = CompiledLibrary("cpu_merge", _declare)
available = LIBRARY.available
why_unavailable = LIBRARY.why_unavailable
MAX_EXPERTS = 256  # the reductions keep one row pointer per expert


def rows_fit(t: torch.Tensor) -> bool:
    """Whether `t` `[n, rows, I]` (a row slice of the experts) has each expert's rows contiguous,
    the layout the kernels read (experts `t.stride(0)` apart)."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2] and t.shape[0] <= MAX_EXPERTS


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def merge_into(
    base: torch.Tensor, deltas: torch.Tensor, a: torch.Tensor, c: torch.Tensor, out: torch.Tensor, *, threads: int
) -> None:
    """`out[u] = c[u]·base + Σ_i a[u, i]·deltas[i]`: `base` `[rows, I]` contiguous, `deltas`
    `[n, rows, I]` with `rows_fit`, `a` `[units, n]`, `c` `[units]`, `out` `[units, rows, I]`
    contiguous (all fp32 CPU)."""
    units, n = a.shape
    LIBRARY.lib.camex_merge(units, n, base.numel(), _ptr(base), _ptr(deltas), deltas.stride(0), _ptr(a), _ptr(c),
                            _ptr(out), threads)  # fmt: skip


def merge_grad(
    grad: torch.Tensor,
    deltas: torch.Tensor,
    *,
    at: torch.Tensor,
    c: torch.Tensor | None,
    base: torch.Tensor | None,
    grad_base: torch.Tensor | None,
    grad_deltas: torch.Tensor | None,
    dots: torch.Tensor | None,
    threads: int,
) -> None:
    """A tile's weight gradient `grad` `[units, rows, I]` reduced onto the parameters in one pass,
    each output optional: `grad_deltas[i] = Σ_u at[i, u]·grad[u]` (it may be `deltas` itself),
    `grad_base = Σ_u c[u]·grad[u]`, and `dots[i, u] += ⟨deltas[i], grad[u]⟩` (`dots` `[n, units]`,
    or `[n + 1, units]` with `base` given: its last row takes `⟨base, grad[u]⟩`)."""
    units, n = grad.shape[0], deltas.shape[0]
    status = LIBRARY.lib.camex_merge_grad(
        units, n, grad[0].numel(), _ptr(grad), _ptr(deltas), deltas.stride(0), _ptr(base), _ptr(at), _ptr(c),
        _ptr(grad_base), _ptr(grad_deltas), 0 if grad_deltas is None else grad_deltas.stride(0), _ptr(dots), threads,
    )  # fmt: skip
    if status == -1:
        raise MemoryError(f"cpu_merge: no memory for {threads} thread(s)' partial sums")
    if status:
        raise ValueError(f"cpu_merge: {n} experts, at most {MAX_EXPERTS}")
