"""How much memory an upcycled model's MoE layers will take to train, estimated from the dense
model before any expert is allocated, so `merge.num_experts=1000000` or `merge.rank=10**9` is
refused in a line instead of dying out of memory minutes later.

Per upcycled linear `[O, I]` with `E` experts: the expert weights `E x O x I` (+ biases), a base
copy, the router `I x E`, and for curvature-aware variants `rank x n` Kronecker factors per mode.
Training holds four copies of each parameter (weights, gradients, AdamW's two moments).
"""

from __future__ import annotations

from torch import nn

from camex.merging.curvature import nearest_factors
from camex.variants import MergeVariant, MoEOptions

TRAINING_COPIES = 4  # weight, gradient, AdamW exp_avg and exp_avg_sq


def moe_bytes(model: nn.Module, variant: MergeVariant, options: MoEOptions) -> tuple[int, int]:
    """(estimated bytes to train the MoE layers, number of linears upcycled); (0, 0) for dense."""
    from camex.upcycle import plan_for

    if variant.layer == "dense":
        return 0, 0
    sites = [s for s in plan_for(model, options).sites if options.layers is None or s.block in options.layers]
    n = options.num_experts
    experts = n + 1 if variant.layer == "smoe" else n
    total = 0
    for site in sites:
        weight, bias, _ = site.dense_weight()
        out_f, in_f = weight.shape
        count = (experts + 1) * out_f * (in_f + (bias is not None)) + in_f * experts
        if variant.curvature:
            out_dims, in_dims = nearest_factors(out_f), nearest_factors(in_f)
            modes = [*out_dims, *in_dims, *(out_dims if bias is not None else ())]
            count += options.rank * n * sum(d * d for d in modes)
        total += count * weight.element_size()
    return total * TRAINING_COPIES, len(sites)


def available_bytes(device: str | None = None) -> int:
    """Free memory where training will run: the current GPU's free memory, else the host's."""
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check(model: nn.Module, variant: MergeVariant, options: MoEOptions, available: int | None = None) -> None:
    """ValueError (turned into a config error by the caller) naming the estimate when it exceeds
    the memory available."""
    need, linears = moe_bytes(model, variant, options)
    have = available_bytes() if available is None else available
    if need > have:
        gib = 2**30
        raise ValueError(
            f"merge.num_experts={options.num_experts}, merge.rank={options.rank}: the {linears} upcycled linears "
            f"need about {need / gib:.3g} GiB to train (weights, gradients, AdamW state), more than the "
            f"{have / gib:.3g} GiB available; allowed: smaller merge.num_experts, merge.rank or fewer merge.layers"
        )
