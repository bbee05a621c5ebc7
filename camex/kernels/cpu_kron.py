"""The curvature's mode products and factor gradients on the CPU without packing (`cpu_kron.c`, issue 20).

Built at first use and called through `ctypes` on the tensors' memory (`cpu_build`: where it
cannot be built, or `CAMEX_CPU_KERNELS=0`, `available()` is False and the PyTorch GEMM path runs
instead, the reference the tests pin these kernels to). fp32 only, on PyTorch's thread count.
"""

from __future__ import annotations

import ctypes
import math

import torch

from camex.kernels.cpu_build import CompiledLibrary


def _declare(lib: ctypes.CDLL) -> None:
    c_long, c_int, c_float, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.camex_mode.argtypes = [c_int, c_long, c_int, c_long, ptr, c_long, c_long, c_long, ptr, ptr, c_float, c_float,
                               c_int]  # fmt: skip
    lib.camex_mode.restype = c_int
    lib.camex_contract.argtypes = [c_int, c_long, c_int, c_long, ptr, ptr, ptr, c_float, c_int]
    lib.camex_contract.restype = c_int


LIBRARY = CompiledLibrary("cpu_kron", _declare)
available = LIBRARY.available
why_unavailable = LIBRARY.why_unavailable


def _split(x: torch.Tensor, k: int) -> tuple[int, int, int, int]:
    n, dims = x.shape[0], x.shape[1:]
    return n, math.prod(dims[:k]), dims[k], math.prod(dims[k + 1 :])


def mode_into(
    x: torch.Tensor, f: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float, beta: float, threads: int = 1
) -> None:
    """`out = beta·out + alpha·(f ×_k x)` for contiguous fp32 CPU `x`, `out` `[n, d_0, ...]` and
    `f` `[n, d_k, d_k]` (any strides: a transposed factor is read in place), on `threads` threads."""
    n, pre, d, post = _split(x, k)
    status = LIBRARY.lib.camex_mode(n, pre, d, post, f.data_ptr(), f.stride(0), f.stride(1), f.stride(2),
                             x.data_ptr(), out.data_ptr(), alpha, beta, threads)  # fmt: skip
    if status:
        raise MemoryError(f"cpu_kron: no memory for {n} transposed {d}x{d} factors")


def contract_into(
    g: torch.Tensor, h: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float, threads: int = 1
) -> None:
    """`out[i] = alpha · Σ g[i] h[i]` over every mode but `k`, for contiguous fp32 CPU `g`, `h`
    `[n, d_0, ...]` and `out` `[n, d_k, d_k]`."""
    n, pre, d, post = _split(g, k)
    if LIBRARY.lib.camex_contract(n, pre, d, post, g.data_ptr(), h.data_ptr(), out.data_ptr(), alpha, threads):
        raise MemoryError(f"cpu_kron: no memory for {threads} thread(s)' {d}-column buffers")
