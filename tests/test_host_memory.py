"""trainer.reuse_host_memory (camex/host_memory.py): large CPU tensors come from the heap and are
reused, instead of a fresh mmap per tensor; a how-to-run key, so a resume may change it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from camex.train import changed_keys

# Run in a fresh interpreter: the setting is per process, and the test process should keep its own.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from camex.host_memory import reuse_freed_memory

    class Mallinfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    took = reuse_freed_memory(sys.argv[1] == "keep")
    before = libc.mallinfo2().hblkhd
    logits = torch.empty(2048, 8192)  # 64 MiB, as the pre-registered GPT-2's logits
    mapped = libc.mallinfo2().hblkhd - before
    print(json.dumps({"took": took, "mapped_mib": mapped / 2**20}))
""")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_large_tensor_comes_from_the_heap_when_freed_memory_is_kept():
    kept, system = _probe("keep"), _probe("system")
    assert kept["took"] and system["took"]
    assert kept["mapped_mib"] == 0  # from the heap: reused by the next step once freed
    assert system["mapped_mib"] >= 64  # glibc's default: a fresh mapping, faulted in again every step


def test_a_resume_may_change_how_host_memory_is_allocated():
    recorded = {"trainer": {"threads": 1, "learning_rate": 1e-3}}  # a run recorded before the key existed
    assert changed_keys(recorded, {"trainer": {"threads": 1, "learning_rate": 1e-3, "reuse_host_memory": True}}) == []
    assert changed_keys({"trainer": {"reuse_host_memory": True}}, {"trainer": {"reuse_host_memory": False}}) == []
