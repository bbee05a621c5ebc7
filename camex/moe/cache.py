"""Memo of parameter-only tensors, valid until any parameter it depends on changes.

A parameter "changes" when its storage is replaced or written in place (optimizer steps,
`load_state_dict` and `copy_` all bump the tensor's version counter).
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
