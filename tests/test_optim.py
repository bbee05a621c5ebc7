"""Weight decay and the curvature factors (SPEC §4): the factors' neutral value is the identity,
so they stay out of decay, found by parameter identity wherever the module nests them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY

from camex import MoEOptions, get_variant, list_variants, upcycle
from camex.moe import KroneckerCurvature
from camex.optim import parameter_groups

CONF = Path(__file__).resolve().parents[1] / "conf"
LR, WD = 0.1, 0.5


def _factors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every curvature factor, listed from the module's own attributes (not by any name rule)."""
    out = []
    for m in model.modules():
        if isinstance(m, KroneckerCurvature):
            out += list(m.weight_factors) + (list(m.bias_factors) if m.bias_factors is not None else [])
    return out


def _zero_grad_step(model: torch.nn.Module, groups: list[dict]) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.optim.AdamW(groups, lr=LR).step()


@pytest.mark.parametrize("variant", list_variants())
@pytest.mark.parametrize("arch", list(TINY))
def test_curvature_factors_are_not_decayed(arch, variant):
    torch.manual_seed(0)
    model = upcycle(TINY[arch].make(), variant, MoEOptions(num_experts=3, rank=2))
    factors = _factors(model)
    assert bool(factors) == get_variant(variant).curvature
    groups = parameter_groups(model, weight_decay=WD)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert [i for i, p in enumerate(factors) if id(p) not in no_decay or id(p) in decay] == []

    before = [p.detach().clone() for p in factors]
    decayed = groups[0]["params"][0]
    decayed_before = decayed.detach().clone()
    _zero_grad_step(model, groups)
    for p, b in zip(factors, before):
        assert torch.equal(p, b)
    # the step did run: a decayed weight moved by exactly lr·wd of itself
    torch.testing.assert_close(decayed, decayed_before * (1 - LR * WD))


def test_released_parity_decays_the_factors():
    torch.manual_seed(0)
    model = upcycle(TINY["bert"].make(), "camex_ties", MoEOptions(num_experts=3, rank=2))
    factors = _factors(model)
    groups = parameter_groups(model, weight_decay=WD, decay_curvature=True)
    assert {id(p) for p in factors} <= {id(p) for p in groups[0]["params"]}
    before = [p.detach().clone() for p in factors]
    _zero_grad_step(model, groups)
    for p, b in zip(factors, before):
        torch.testing.assert_close(p, b * (1 - LR * WD))


@pytest.mark.parametrize("decay", [False, True])
def test_trainer_builds_groups_from_merge_curvature_decay(decay):
    """`merge.curvature_decay` composes through Hydra into MoEOptions, and the training loop's
    optimizer follows it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from camex.config import merge_options
    from camex.train import _CamexTrainerMixin

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["merge=camex", f"merge.curvature_decay={str(decay).lower()}"])
    _, options = merge_options(OmegaConf.to_container(cfg.merge))
    assert options.curvature_decay is decay

    torch.manual_seed(0)
    model = upcycle(TINY["bert"].make(), "camex", options.replace(num_experts=3))
    trainer = _CamexTrainerMixin()
    trainer.optimizer, trainer.model, trainer.decay_curvature = None, model, options.curvature_decay
    trainer.args = SimpleNamespace(weight_decay=WD, learning_rate=LR, adam_beta1=0.9, adam_beta2=0.98,
                                   adam_epsilon=1e-6)  # fmt: skip
    decayed = {id(p) for g in trainer.create_optimizer().param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all((id(p) in decayed) is decay for p in _factors(model))
