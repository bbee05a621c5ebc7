"""Build and load one of this package's C sources (`cpu_kron.c`, `cpu_merge.c`) at first use.

Each source is compiled with the system's C compiler (`CC`, else `cc`) for AVX2 and FMA into a
per-user cache, named by the hash of the source and flags, and loaded through `ctypes`. Where
there is no compiler, no AVX2/FMA CPU, or `CAMEX_CPU_KERNELS=0`, `available()` is False and the
callers run PyTorch's ops instead (the reference the tests pin the kernels to). The libraries are
built with `-fopenmp` and bind to the `libgomp.so.1` PyTorch has already loaded, so their parallel
regions run on PyTorch's own threads instead of a second pool competing with them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-std=c99", "-fopenmp"]


def _cpu_has_avx2_fma() -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma"} <= words


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "camex" / "kernels"


def _compile(cc: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: concurrent first uses (test workers, sweep
    # trials) never load a half-written library
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([cc, *FLAGS, str(source), "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


class CompiledLibrary:
    """The library built from `camex/kernels/<stem>.c`; `declare` sets its functions' signatures."""

    def __init__(self, stem: str, declare: Callable[[ctypes.CDLL], None]) -> None:
        self.stem, self.declare = stem, declare
        self.source = Path(__file__).with_name(f"{stem}.c")
        self._lib: ctypes.CDLL | None = None
        self._why_not: str | None = None
        self._tried = False

    def tag(self) -> str:
        """The build's name: the source, the headers beside it and the flags hashed, so an edited
        source or header is rebuilt."""
        headers = sorted(self.source.parent.glob("*.h"))
        data = b"".join(p.read_bytes() for p in [self.source, *headers]) + " ".join(FLAGS).encode()
        return hashlib.sha256(data).hexdigest()[:16]

    def load(self) -> tuple[ctypes.CDLL | None, str | None]:
        """Build (where not cached) and load: the library, or None and why not."""
        if os.environ.get("CAMEX_CPU_KERNELS", "1") == "0":
            return None, "switched off (CAMEX_CPU_KERNELS=0)"
        if not _cpu_has_avx2_fma():
            return None, "no AVX2/FMA CPU"
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            return None, "no C compiler (set CC)"
        if not self.source.is_file():
            return None, f"build failed: the source {self.source} is not installed"
        target = _cache_dir() / f"{self.stem}_{self.tag()}.so"
        try:
            if not target.exists():
                _compile(cc, self.source, target)
            lib = ctypes.CDLL(str(target))
        except subprocess.CalledProcessError as e:
            return None, f"build failed: {cc} {' '.join(FLAGS)} {self.source}: {(e.stderr or '').strip()[:500]}"
        except OSError as e:
            return None, f"build or load failed: {e}"
        self.declare(lib)
        return lib, None

    def why_unavailable(self) -> str | None:
        """None where the library runs, else why not (switched off, no AVX2/FMA CPU, no compiler, or
        the build failed: that last one is also warned about once, since it is a fault, not a choice)."""
        if not self._tried:
            self._lib, self._why_not = self.load()
            self._tried = True
            if self._why_not and self._why_not.startswith("build"):
                warnings.warn(
                    f"camex CPU kernels ({self.stem}) unavailable, PyTorch's ops run instead: {self._why_not}",
                    stacklevel=3,
                )
        return self._why_not

    def available(self) -> bool:
        """Whether the library can run here (built on the first call)."""
        return self.why_unavailable() is None

    @property
    def lib(self) -> ctypes.CDLL:
        if not self.available():
            raise RuntimeError(f"camex CPU kernels ({self.stem}) unavailable: {self._why_not}")
        return self._lib


def plain_cpu_fp32(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may take these operands: fp32 CPU tensors, contiguous, and no PyTorch
    dispatch mode active (a mode such as `FlopCounterMode` must see every product as an op)."""
    if _get_current_dispatch_mode() is not None:
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
