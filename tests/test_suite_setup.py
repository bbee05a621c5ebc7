"""How the suite shares the machine: `pytest -n N` (README) gives each worker, and every run it
starts as a subprocess, its share of the cores (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def test_a_worker_and_the_runs_it_starts_do_not_oversubscribe_the_cores():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        pytest.skip("one process at a time: torch's own thread default")
    probe = "import torch; print(torch.get_num_threads())"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    threads = torch.get_num_threads()
    assert int(child.stdout) == threads == int(os.environ["OMP_NUM_THREADS"])
    assert threads * workers <= max(os.cpu_count() or 1, workers)
