"""camex: curvature-aware merging of experts (CAMEx, ICLR 2025), reproduced."""

import sys
import types
from importlib import import_module

# Library names resolve on first use, so `import camex.report` (MLflow -> tables, run on a laptop
# against a tracking server) never imports torch.
_EXPORTS = {
    "MergeVariant": "camex.variants",
    "MoEOptions": "camex.variants",
    "load": "camex.compose",
    "get_variant": "camex.variants",
    "list_variants": "camex.variants",
    "upcycle": "camex.upcycle",
}
__all__ = ["MergeVariant", "MoEOptions", "compose", "get_variant", "list_variants", "load", "upcycle"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "compose":  # the sub-package, callable: camex.compose(base, experts, ...)
        return import_module("camex.compose")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'camex' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`camex.upcycle` stays the function even once the `camex.upcycle` sub-package is imported
    (the import system would otherwise bind the sub-package to that name)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _inside(root: str, path: str) -> str:
    from camex.config import inside

    return inside(str(root), str(path))


def _register_resolvers() -> None:
    """`${camex.inside:ROOT,PATH}` (conf/config.yaml's hydra.run.dir): PATH, or an error when it
    leaves ROOT — resolved by Hydra before it creates the folder, so nothing is written outside."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("camex.inside"):
        OmegaConf.register_new_resolver("camex.inside", _inside)


_register_resolvers()
