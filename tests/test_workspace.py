"""Reused CPU work buffers and large outputs of the hand-written passes (camex.merging.workspace)."""

from __future__ import annotations

import threading

import torch

from camex.merging import workspace


def test_buffers_are_reused_per_name_dtype_and_thread():
    like = torch.zeros(1)
    a = workspace.buffer("test_a", 100, like)
    assert a.shape == (100,) and a.dtype == torch.float32
    assert workspace.buffer("test_a", 60, like).data_ptr() == a.data_ptr()  # smaller: the same memory
    assert workspace.buffer("test_b", 100, like).data_ptr() != a.data_ptr()
    assert workspace.buffer("test_a", 100, like.double()).data_ptr() != a.data_ptr()
    grown = workspace.buffer("test_a", 1000, like)
    assert grown.numel() == 1000 and workspace.buffer("test_a", 10, like).data_ptr() == grown.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(workspace.buffer("test_a", 1000, like).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != grown.data_ptr()  # each thread holds its own


def test_empty_like_gives_a_fresh_contiguous_tensor_of_any_size():
    small = torch.zeros(3, 4, dtype=torch.float64).t()
    out = workspace.empty_like(small)
    assert out.shape == small.shape and out.dtype == torch.float64 and out.is_contiguous()
    big = torch.zeros(2, workspace.HUGE_PAGE_BYTES // 4)  # above the huge-page threshold
    out = workspace.empty_like(big, (3, big.shape[1]))
    assert out.shape == (3, big.shape[1]) and out.data_ptr() != big.data_ptr()
    out.fill_(2.0)
    assert bool((out == 2.0).all())
