"""How the C library hands host (CPU) memory to torch: keep freed blocks for reuse (`trainer.reuse_host_memory`).

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh `mmap` and
returns it with `munmap` when freed. A CPU training step allocates and frees many such tensors (the
pre-registered GPT-2's logits are [2048, 8192] fp32 = 64 MiB, and so are their log-softmax and
gradient), so every step the kernel faults in and zeroes those pages again: a 64 MiB
`torch.empty(...).fill_(0)` took 44 ms against 4 ms for refilling a live buffer on this project's CPU
machine. With mmap off and trimming off, freed blocks stay in the heap and the next step reuses them.
Nothing computed changes (same kernels, same bits); the cost is that the process keeps its peak heap
until it exits. Set per process, so every run (and every parallel-launcher worker) sets it again.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 64 * 2**20}
# glibc's documented defaults; setting them also turns off its dynamic mmap threshold, which is
# what returned the large blocks in the first place
_SYSTEM = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024}


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    except OSError:
        return None


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Keep freed host memory in the process (`enabled`) or give it back as glibc does by default.

    Returns whether the C library took the setting: False off Linux or on a C library without
    glibc's `mallopt` parameters (musl accepts the call and ignores it), where nothing changes.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    values = _KEEP if enabled else _SYSTEM
    return all(mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in values.items())
