"""Routing a composed decoder LM without MoE fine-tuning (MERGEME.md §2.2), per sequence.

* `perplexity`: every source (dense expert) model scores the input; the expert weights are
  `softmax(top-K(1/PPL_i) / T)` (zero outside the top K). MergeME publishes `T = 1`, which with
  PPLs of 8 and 12 gives 0.51/0.49; `T < 1` sharpens the weights.
* `task_vector`: the cosine between the base model's descent direction on the input (minus the
  gradient of its loss) and each task vector `τ_i = θ_i − θ_base` (over every parameter both
  hold), in place of `1/PPL_i`. MergeME prints `τ` with the opposite sign (MERGEME.md §2); with
  `τ` as defined here an expert trained on text like the input moved along the descent direction.

Either costs extra forward passes (perplexity: one per source; task vector: one forward and one
backward of the base per sequence); `RoutingCost` counts them and the tokens they read.

The weights drive the composed model through `SequenceWeightsGate` (every router of the merged-
attention MoE reads the same per-sequence weights; a last base expert of token top-k SMoE gets
weight 0) or through `camex.compose.separate` (each selected expert runs its own blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from camex.compose.routers import routers

METHODS = ("perplexity", "task_vector")
ATTENTION = ("merged", "separate")


@dataclass(frozen=True)
class HeuristicRouting:
    method: str = "perplexity"
    top_k: int = 2  # K: experts with non-zero weight per sequence
    temperature: float = 1.0  # T: softmax(top-K(score) / T); MergeME's value is 1
    attention: str = "merged"  # merged: the composed MoE; separate: each expert's own blocks (camex.compose.separate)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compose.routing.method={self.method!r} is not one of {list(METHODS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"compose.routing.attention={self.attention!r} is not one of {list(ATTENTION)}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"compose.routing.top_k={self.top_k!r} is invalid; allowed: an integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"compose.routing.temperature={t!r} is invalid; allowed: a number > 0")


@dataclass
class RoutingCost:
    """The routing's extra work: passes through source / base models and the tokens they read;
    `flops` is the usual estimate, 2 FLOPs per parameter per token forward (x3 with a backward)."""

    forwards: int = 0
    backwards: int = 0
    tokens: int = 0
    flops: float = 0.0
    per_source: list[int] = field(default_factory=list)  # forward passes per source model

    def add(self, model: nn.Module, tokens: int, *, backward: bool = False, source: int | None = None) -> None:
        params = sum(p.numel() for p in model.parameters())
        self.forwards += 1
        self.backwards += int(backward)
        self.tokens += tokens
        self.flops += (6.0 if backward else 2.0) * params * tokens
        if source is not None:
            self.per_source.extend([0] * (source + 1 - len(self.per_source)))
            self.per_source[source] += 1

    def as_dict(self) -> dict:
        return asdict(self)


def sequence_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[batch]`: each sequence's mean next-token negative log-likelihood under a causal LM
    (padding excluded; a sequence needs two real tokens)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    target, real = input_ids[:, 1:], mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    counts = real.sum(1)
    if (counts == 0).any():
        raise ValueError("perplexity routing needs at least two real tokens per sequence")
    return (nll * real).sum(1) / counts


@torch.no_grad()
def source_perplexities(
    sources: Sequence[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    cost: RoutingCost | None = None,
) -> torch.Tensor:  # fmt: skip
    """`[batch, n]`: the perplexity of each sequence under each source model (one forward each)."""
    out = []
    for i, model in enumerate(sources):
        was_training = model.training
        model.eval()
        out.append(sequence_nll(model, input_ids, attention_mask).exp())
        model.train(was_training)
        if cost is not None:
            real = input_ids.numel() if attention_mask is None else int(attention_mask.sum())
            cost.add(model, real, source=i)
    return torch.stack(out, 1)


def topk_softmax(scores: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """`softmax(top-K(scores) / T)` per row, zero outside the top K (ties: the lower index)."""
    k = min(top_k, scores.shape[-1])
    top, idx = scores.float().topk(k, dim=-1)
    return torch.zeros_like(scores, dtype=torch.float32).scatter(-1, idx, torch.softmax(top / temperature, -1))


def perplexity_weights(ppl: torch.Tensor, spec: HeuristicRouting) -> torch.Tensor:
    """`[batch, n]` expert weights from the sources' perplexities: softmax(top-K(1/PPL) / T)."""
    return topk_softmax(1.0 / ppl, spec.top_k, spec.temperature)


def task_vector_scores(
    base: nn.Module, taus: Sequence[dict[str, torch.Tensor]], input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None, cost: RoutingCost | None = None,
) -> torch.Tensor:  # fmt: skip
    """`[batch, n]`: cosine between minus the base model's loss gradient on each sequence and each task
    vector (`{parameter name: τ_i}`; names the base lacks are ignored). One forward and backward
    of the base per sequence."""
    params = dict(base.named_parameters())
    names = sorted(set.intersection(*(set(t) for t in taus)) & set(params))
    if not names:
        raise ValueError("task-vector routing: the task vectors share no parameter with the base model")
    was_training = base.training
    base.eval()
    rows = []
    try:
        for b in range(input_ids.shape[0]):
            ids = input_ids[b : b + 1]
            mask = None if attention_mask is None else attention_mask[b : b + 1]
            grads = torch.autograd.grad(sequence_nll(base, ids, mask).sum(), [params[n] for n in names])
            g = torch.cat([x.reshape(-1).float() for x in grads])
            rows.append(torch.stack([F.cosine_similarity(-g, torch.cat([t[n].reshape(-1).float() for n in names]), 0)
                                     for t in taus]))  # fmt: skip
            if cost is not None:
                cost.add(base, ids.numel() if mask is None else int(mask.sum()), backward=True)
    finally:
        base.train(was_training)
    return torch.stack(rows)


def task_vectors(base: nn.Module, sources: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """`τ_i = θ_i − θ_base` per parameter name, for every source."""
    theta = {n: p.detach() for n, p in base.named_parameters()}
    return [{n: p.detach() - theta[n] for n, p in s.named_parameters() if n in theta} for s in sources]


def route(
    spec: HeuristicRouting, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    sources: Sequence[nn.Module] = (), base: nn.Module | None = None,
    taus: Sequence[dict[str, torch.Tensor]] | None = None, cost: RoutingCost | None = None,
) -> torch.Tensor:  # fmt: skip
    """`[batch, n]` expert weights for a batch, by `spec.method`."""
    if spec.method == "perplexity":
        return perplexity_weights(source_perplexities(sources, input_ids, attention_mask, cost), spec)
    if base is None:
        raise ValueError("compose.routing.method=task_vector needs the base model")
    taus = task_vectors(base, sources) if taus is None else taus
    return topk_softmax(task_vector_scores(base, taus, input_ids, attention_mask, cost), spec.top_k, spec.temperature)


class SequenceWeights:
    """The expert weights `[batch, n]` of the next forward passes, shared by all gates."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None


class SequenceWeightsGate(nn.Module):
    """Each sequence's given weights on every routed unit (units laid out sequence-major); a last
    expert beyond the weights' columns (token top-k SMoE's base FFN) gets weight 0."""

    def __init__(self, num_experts: int, holder: SequenceWeights) -> None:
        super().__init__()
        self.num_experts, self.holder = num_experts, holder
        self.top_k = num_experts

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        w = self.holder.weights
        if w is None:
            raise RuntimeError("heuristic routing needs the weights of each sequence: call set_sequence_weights first")
        if u.shape[0] % w.shape[0]:
            raise RuntimeError(f"heuristic routing: {u.shape[0]} routed units for {w.shape[0]} sequences")
        w = F.pad(w.to(device=u.device, dtype=u.dtype), (0, self.num_experts - w.shape[1]))
        return w.repeat_interleave(u.shape[0] // w.shape[0], dim=0)

    def pop_aux(self) -> None:
        return None


def install_sequence_weights(model: nn.Module) -> SequenceWeights:
    """Replace every gate of a composed MoE by one reading the same per-sequence weights."""
    holder = SequenceWeights()
    for r in routers(model):
        r.gate = SequenceWeightsGate(r.gate.num_experts, holder)
    model.camex_sequence_weights = holder
    return holder


def set_sequence_weights(model: nn.Module, weights: torch.Tensor | None) -> None:
    """The `[batch, n]` expert weights of the next passes (set before the prompt; kept through generation)."""
    holder = getattr(model, "camex_sequence_weights", None)
    if holder is None:
        raise RuntimeError("this model has no heuristic routing (call install_sequence_weights first)")
    holder.weights = weights
