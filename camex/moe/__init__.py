"""MoE modules: gate, routing units, mask strategies, curvature, merged/SMoE layers, EP chain."""

from camex.moe.aux import attach_aux_loss, pop_aux_loss
from camex.moe.chain import ExpertChain
from camex.moe.curvature import KroneckerCurvature
from camex.moe.gate import NoisyTopKGate
from camex.moe.masking import DareMask, NoMask, TiesMask, build_mask
from camex.moe.merged import MergedExpertLinear
from camex.moe.smoe import TokenMoELinear
from camex.moe.units import Routing, RoutingContext, SharedRouting, UnitRouter

__all__ = [
    "DareMask",
    "ExpertChain",
    "KroneckerCurvature",
    "MergedExpertLinear",
    "NoMask",
    "NoisyTopKGate",
    "Routing",
    "RoutingContext",
    "SharedRouting",
    "TiesMask",
    "TokenMoELinear",
    "UnitRouter",
    "attach_aux_loss",
    "build_mask",
    "pop_aux_loss",
]
