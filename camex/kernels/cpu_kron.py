"""The curvature's mode products and factor gradients on the CPU without packing (`cpu_kron.c`, issue 20).

The C source is compiled at first use with the system's C compiler (`CC`, else `cc`) for AVX2 and
FMA, into a per-user cache keyed by the source's hash, and called through `ctypes` on the
tensors' memory. Where there is no compiler, no AVX2/FMA CPU, or `CAMEX_CPU_KERNELS=0`,
`available()` is False and the PyTorch GEMM path runs instead (it is also the reference the tests
pin these kernels to). fp32 only. They run on PyTorch's thread count, in OpenMP regions of the
OpenMP runtime PyTorch has loaded (built with `-fopenmp`, the library binds to the `libgomp.so.1`
already in the process), so they share PyTorch's threads instead of competing with them.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kron.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-std=c99", "-fopenmp"]
_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # why the kernels are unavailable, once tried
_tried = False


def _cpu_has_avx2_fma() -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma"} <= words


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "camex" / "kernels"


def _tag() -> str:
    """The build's name: the source and flags hashed, so an edited source is rebuilt."""
    return hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]


def _compile(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: concurrent first uses (test workers, sweep
    # trials) never load a half-written library
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("CAMEX_CPU_KERNELS", "1") == "0":
        return None, "switched off (CAMEX_CPU_KERNELS=0)"
    if not _cpu_has_avx2_fma():
        return None, "no AVX2/FMA CPU"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (set CC)"
    if not _SOURCE.is_file():
        return None, f"build failed: the source {_SOURCE} is not installed"
    target = _cache_dir() / f"cpu_kron_{_tag()}.so"
    try:
        if not target.exists():
            _compile(cc, target)
        lib = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as e:
        return None, f"build failed: {cc} {' '.join(_FLAGS)} {_SOURCE}: {(e.stderr or '').strip()[:500]}"
    except OSError as e:
        return None, f"build or load failed: {e}"
    c_long, c_int, c_float, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.camex_mode.argtypes = [c_int, c_long, c_int, c_long, ptr, c_long, c_long, c_long, ptr, ptr, c_float, c_float,
                               c_int]  # fmt: skip
    lib.camex_mode.restype = c_int
    lib.camex_contract.argtypes = [c_int, c_long, c_int, c_long, ptr, ptr, ptr, c_float, c_int]
    lib.camex_contract.restype = c_int
    return lib, None


def available() -> bool:
    """Whether the compiled kernels can run here (built on the first call)."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """None where the kernels run, else why not (switched off, no AVX2/FMA CPU, no compiler, or the
    build failed: that last one is also warned about once, since it is a fault, not a choice)."""
    global _lib, _why_not, _tried
    if not _tried:
        _lib, _why_not = _load()
        _tried = True
        if _why_not and _why_not.startswith("build"):
            warnings.warn(f"camex CPU kernels unavailable, PyTorch's GEMMs run instead: {_why_not}", stacklevel=2)
    return _why_not


def _split(x: torch.Tensor, k: int) -> tuple[int, int, int, int]:
    n, dims = x.shape[0], x.shape[1:]
    return n, math.prod(dims[:k]), dims[k], math.prod(dims[k + 1 :])


def mode_into(
    x: torch.Tensor, f: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float, beta: float, threads: int = 1
) -> None:
    """`out = beta·out + alpha·(f ×_k x)` for contiguous fp32 CPU `x`, `out` `[n, d_0, ...]` and
    `f` `[n, d_k, d_k]` (any strides: a transposed factor is read in place), on `threads` threads."""
    n, pre, d, post = _split(x, k)
    status = _lib.camex_mode(n, pre, d, post, f.data_ptr(), f.stride(0), f.stride(1), f.stride(2),
                             x.data_ptr(), out.data_ptr(), alpha, beta, threads)  # fmt: skip
    if status:
        raise MemoryError(f"cpu_kron: no memory for {n} transposed {d}x{d} factors")


def contract_into(
    g: torch.Tensor, h: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float, threads: int = 1
) -> None:
    """`out[i] = alpha · Σ g[i] h[i]` over every mode but `k`, for contiguous fp32 CPU `g`, `h`
    `[n, d_0, ...]` and `out` `[n, d_k, d_k]`; the modes after `k` are not all of size 1."""
    n, pre, d, post = _split(g, k)
    if post == 1:
        raise ValueError("cpu_kron.contract_into: with nothing after mode k, the contraction is one GEMM: PyTorch's")
    if _lib.camex_contract(n, pre, d, post, g.data_ptr(), h.data_ptr(), out.data_ptr(), alpha, threads):
        raise MemoryError(f"cpu_kron: no memory for {threads} thread(s)' {d}-column buffers")
