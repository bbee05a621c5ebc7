"""The curvature's mode products on the CPU without packing (`cpu_kron.c`, issue 20).

The C source is compiled at first use with the system's C compiler (`CC`, else `cc`) for AVX2 and
FMA, into a per-user cache keyed by the source's hash, and called through `ctypes` on the
tensors' memory. Where there is no compiler, no AVX2/FMA CPU, or `CAMEX_CPU_KERNELS=0`,
`available()` is False and the PyTorch GEMM path runs instead (it is also the reference the tests
pin these kernels to). fp32 only; single-threaded: `camex.merging.curvature` calls them only when
PyTorch runs on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kron.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-std=c99"]
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(flags.split())
    return {"avx2", "fma"} <= words


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "camex" / "kernels"


def _build() -> ctypes.CDLL | bool:
    if os.environ.get("CAMEX_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2_fma():
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kron_{tag}.so"
    if not target.exists():
        partial = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # built under a temporary name and renamed: concurrent first uses (test workers,
            # sweep trials) never load a half-written library
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
                partial = Path(tmp.name)
            subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(partial)], check=True, capture_output=True)
            os.replace(partial, target)
        except (OSError, subprocess.CalledProcessError):
            if partial is not None:
                partial.unlink(missing_ok=True)
            return False
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return False
    c_long, c_int, c_float, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.camex_mode.argtypes = [c_int, c_long, c_int, c_long, ptr, c_long, c_long, c_long, ptr, ptr, c_float, c_float]
    lib.camex_mode.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernels can run here (built on the first call)."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib is not False


def _split(x: torch.Tensor, k: int) -> tuple[int, int, int, int]:
    n, dims = x.shape[0], x.shape[1:]
    return n, math.prod(dims[:k]), dims[k], math.prod(dims[k + 1 :])


def mode_into(x: torch.Tensor, f: torch.Tensor, k: int, out: torch.Tensor, *, alpha: float, beta: float) -> None:
    """`out = beta·out + alpha·(f ×_k x)` for contiguous fp32 CPU `x`, `out` `[n, d_0, ...]` and
    `f` `[n, d_k, d_k]` (any strides: a transposed factor is read in place)."""
    n, pre, d, post = _split(x, k)
    _lib.camex_mode(n, pre, d, post, f.data_ptr(), f.stride(0), f.stride(1), f.stride(2),
                    x.data_ptr(), out.data_ptr(), alpha, beta)  # fmt: skip
