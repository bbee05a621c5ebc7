"""Memo of parameter-only tensors, valid until any parameter it depends on changes.

A parameter "changes" when its storage is replaced or written in place (optimizer steps,
`load_state_dict` and `copy_` all bump the tensor's version counter).

A write through `p.data` (DeepSpeed's parameter copies, EMA-style updates) changes neither:
`.data` is a new tensor with its own version counter, and no property that stays cheap to read
(pointer, version, shape) sees the write; only the values do, and fingerprinting them on every
call would cost one read of every parameter per layer and forward (for an EP chain, of every
earlier layer too), which is what the cache exists to save. So the layers that hold a memo drop
it whenever they enter train or eval mode (`model.train()` / `model.eval()`): code that writes
`.data` between two evaluations enters eval mode again before the second, as evaluation loops do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def parameter_key(params: Iterable[torch.Tensor]) -> tuple:
    return tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)


class ParameterMemo:
    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key != self._key:
            self._value, self._key = compute(), key
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None
