"""Hydra override syntax -> an Optuna search space.

`hydra.sweeper.params` and the command line use Hydra's own syntax; the command line wins for a
key given in both:

    trainer.batch_size=8,16,32,64            categorical (also choice(...), range(a,b))
    trainer.learning_rate=interval(1e-5,3e-4)     float, uniform (TPE / random only)
    trainer.learning_rate=tag(log,interval(1e-5,3e-4))   float, log-uniform
    merge.rank=tag(int,interval(1,8))        integer
    task=glue/mrpc                           fixed: passed unchanged to every trial
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

# fixed overrides that say how to run, not what: they do not change which study a command belongs to
NOT_IDENTITY = ("tracking", "resume", "overwrite", "paths.output_root", "trainer.progress_bar", "trainer.num_workers")


class SearchSpaceError(ValueError):
    """A sweep parameter the sampler cannot use."""


@dataclass
class SearchSpace:
    fixed: list[str]  # overrides every trial gets
    distributions: dict[str, BaseDistribution]  # override key -> what the sampler draws from

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's value lists; every parameter must be a list of values."""
        grid = {}
        for name, dist in self.distributions.items():
            if not isinstance(dist, CategoricalDistribution):
                raise SearchSpaceError(
                    f"{name}: the grid sampler needs a list of values (a,b,c), "
                    "not an interval; use sampler=tpe or sampler=random for intervals"
                )
            grid[name] = list(dist.choices)
        return grid

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then the sampled values."""
        return [*self.fixed, *(f"{name}={Transformer.str(params[name])}" for name in self.distributions)]

    def identity(self, sampler: str) -> str:
        """A short hash naming this search: same space, fixed overrides and sampler -> same study."""
        fixed = sorted(o for o in self.fixed if not o.lstrip("+~").startswith(NOT_IDENTITY))
        space = {name: repr(dist) for name, dist in sorted(self.distributions.items())}
        text = json.dumps({"fixed": fixed, "space": space, "sampler": sampler}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def describe(self) -> dict[str, str]:
        """Search space and fixed overrides by key (without the +/++/~ prefix), for the MLflow parent run."""
        return {
            **{f"space.{name.lstrip('+~')}": _describe(dist) for name, dist in self.distributions.items()},
            **{f"fixed.{o.split('=', 1)[0].lstrip('+~')}": o.split("=", 1)[-1] for o in self.fixed},
        }


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return ",".join(Transformer.str(c) for c in dist.choices)
    kind = "int" if isinstance(dist, IntDistribution) else "float"
    return f"{kind}{'(log)' if dist.log else ''}[{dist.low},{dist.high}]"


def _distribution(override: Override) -> BaseDistribution:
    key = override.get_key_element()
    if override.is_discrete_sweep():
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if not values:
            raise SearchSpaceError(f"{key}: the sweep has no values")
        return CategoricalDistribution(values)
    if override.is_interval_sweep():
        sweep = override.value()
        tags = set(sweep.tags or ())
        low, high = sweep.start, sweep.end
        if low is None or high is None or not low < high:
            raise SearchSpaceError(f"{key}: interval needs low < high, got ({low}, {high})")
        if "int" in tags:
            return IntDistribution(int(low), int(high), log="log" in tags)
        return FloatDistribution(float(low), float(high), log="log" in tags)
    raise SearchSpaceError(f"{key}: unsupported sweep {override.input_line!r}; use a,b,c / choice / range / interval")


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(Transformer.str(v) for v in value)
    return f"{key}={value}"


def parse(params: Mapping[str, Any] | None, arguments: list[str], parser: OverridesParser) -> SearchSpace:
    """The search space of `hydra.sweeper.params` plus the command line (which wins per key)."""
    lines = [_as_override(str(k), v) for k, v in (params or {}).items()] + list(arguments)
    by_key: dict[str, Override] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element().lstrip("+~")
        by_key.pop(key, None)  # a later definition replaces an earlier one, and takes its place in the order
        by_key[key] = override
    fixed, distributions = [], {}
    for override in by_key.values():
        if override.is_sweep_override():
            distributions[override.get_key_element()] = _distribution(override)
        else:
            fixed.append(override.input_line or _as_override(override.get_key_element(), override.value()))
    return SearchSpace(fixed, distributions)
