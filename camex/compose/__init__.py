"""An MoE from a base dense model and several fine-tunes of it (MERGEME.md), CAMEx on top.

model = camex.compose("base/", {"news": "ft-news/", "code": "ft-code/"}, shared="ties", router="centroid",
                      prompts={...})
camex.compose.save(model, "out/"); model = camex.load("out/")
"""

from __future__ import annotations

import sys
import types

from camex.compose.build import Composition, compose, compose_into
from camex.compose.routers import RouterInit, routed_domains, set_domains
from camex.compose.saving import load, save
from camex.compose.shared import SharedMerge, merge_task_vectors
from camex.compose.sources import ComposeError

__all__ = [
    "ComposeError",
    "Composition",
    "RouterInit",
    "SharedMerge",
    "compose",
    "compose_into",
    "load",
    "merge_task_vectors",
    "routed_domains",
    "save",
    "set_domains",
]


class _CallableModule(types.ModuleType):
    """`camex.compose(...)` calls `compose` even where the sub-package itself is what is bound."""

    def __call__(self, *args, **kwargs):
        return compose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
