"""Router initialisation of a composed MoE (MERGEME.md §3) and oracle routing.

* `random`: the gates as built (seeded by the composition's seed).
* `uniform`: zero gate weights: every expert scores alike.
* `centroid`: per router, the masked-mean hidden state entering its FFN over K prompts per
  domain, computed through the composed model with that domain's expert selected, normalised to
  unit length, as the gate's column for that domain (scaled by `scale`).
* `cheap_embed`: the same from the token embeddings alone (one set of columns for every router).
* `oracle`: no gate parameters; each sequence is routed one-hot to its known domain, set with
  `set_domains` before the forward pass (evaluation and tests).

With token top-k SMoE the base FFN is the last expert; its centroid column is the mean over all
domains' prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from camex.moe import NoisyTopKGate, UnitRouter
from camex.moe.units import as_sequences, masked_mean

INITS = ("random", "uniform", "centroid", "cheap_embed", "oracle")


@dataclass(frozen=True)
class RouterInit:
    init: str = "random"
    scale: float = 1.0  # centroid / cheap_embed: gate logits are `scale · <u, ĉ_i>`
    max_length: int = 128  # prompts are truncated to this many tokens
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"compose.router.init={self.init!r} is not one of {list(INITS)}")

    def as_dict(self) -> dict:
        return asdict(self)


class DomainIds:
    """The domain index of each sequence of the next forward pass, shared by all oracle gates."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None


class OracleGate(nn.Module):
    """One-hot scores on each unit's known domain; units are laid out sequence-major."""

    def __init__(self, num_experts: int, domains: DomainIds) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.domains = num_experts, 1, domains

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        ids = self.domains.ids
        if ids is None:
            raise RuntimeError("oracle routing needs the domain of each sequence: call camex.compose.set_domains first")
        ids = ids.to(u.device)
        if u.shape[0] % ids.shape[0]:
            raise RuntimeError(f"oracle routing: {u.shape[0]} routed units for {ids.shape[0]} domain ids")
        per_unit = ids.repeat_interleave(u.shape[0] // ids.shape[0])
        return F.one_hot(per_unit, self.num_experts).to(u.dtype)

    def pop_aux(self) -> None:
        return None


def routers(model: nn.Module) -> list[UnitRouter]:
    return [m for m in model.modules() if isinstance(m, UnitRouter)]


def install_oracle(model: nn.Module) -> DomainIds:
    """Replace every gate by an oracle gate reading one shared `DomainIds`."""
    domains = DomainIds()
    for r in routers(model):
        r.gate = OracleGate(r.gate.num_experts, domains)
    model.camex_domains = domains
    return domains


def set_domains(model: nn.Module, ids: Sequence[int] | torch.Tensor | None) -> None:
    """The domain index (position in the composition's experts) of each sequence of the next pass."""
    holder = getattr(model, "camex_domains", None)
    if holder is None:
        raise RuntimeError("this model has no oracle routing (compose it with router init 'oracle')")
    holder.ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long)


@contextmanager
def oracle_routing(model: nn.Module):
    """Temporarily route every gate by oracle (restores the gates afterwards)."""
    saved = [(r, r.gate) for r in routers(model)]
    previous = getattr(model, "camex_domains", None)
    domains = install_oracle(model)
    try:
        yield domains
    finally:
        for r, gate in saved:
            r.gate = gate
        if previous is None:
            del model.camex_domains
        else:
            model.camex_domains = previous


def _batches(tokenizer, texts: Sequence[str], spec: RouterInit):
    for start in range(0, len(texts), spec.batch_size):
        chunk = list(texts[start : start + spec.batch_size])
        yield tokenizer(chunk, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")


def _forward(model: nn.Module, batch) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        start = model.config.decoder_start_token_id or 0
        decoder = torch.full((batch["input_ids"].shape[0], 1), start, dtype=torch.long)
        model(**batch, decoder_input_ids=decoder)
    else:
        model(**batch)


def _pooled_input(router: UnitRouter, x: torch.Tensor) -> torch.Tensor:
    """`[batch, d]`: the masked-mean input of the router's layer per sequence (memory: as routed)."""
    if router.unit == "memory":
        return router.context.memory.to(x.dtype)
    seqs = as_sequences(x)
    return masked_mean(seqs, router._token_mask(seqs), 1)


@torch.no_grad()
def hidden_centroids(
    model: nn.Module, tokenizer, prompts: Mapping[str, Sequence[str]], spec: RouterInit
) -> list[torch.Tensor]:
    """Per router, `[domains, d]` mean pooled inputs, each domain run with its expert selected."""
    rs = routers(model)
    per_domain: list[list[torch.Tensor]] = [[] for _ in rs]
    captured: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        def pre(module, args):
            captured.setdefault(index, []).append(_pooled_input(module, args[0]).float())

        return pre

    handles = [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(rs)]
    was_training = model.training
    model.eval()
    try:
        with oracle_routing(model) as domains:
            for d, texts in enumerate(prompts.values()):
                captured.clear()
                for batch in _batches(tokenizer, texts, spec):
                    domains.ids = torch.full((batch["input_ids"].shape[0],), d, dtype=torch.long)
                    _forward(model, batch)
                for i in range(len(rs)):
                    per_domain[i].append(torch.cat(captured[i]).mean(0))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.stack(c) for c in per_domain]


@torch.no_grad()
def embedding_centroids(
    model: nn.Module, tokenizer, prompts: Mapping[str, Sequence[str]], spec: RouterInit
) -> torch.Tensor:
    """`[domains, d]` masked-mean token embeddings of each domain's prompts."""
    embed = model.get_input_embeddings()
    out = []
    for texts in prompts.values():
        pooled = [
            masked_mean(embed(b["input_ids"]).float(), b["attention_mask"], 1) for b in _batches(tokenizer, texts, spec)
        ]
        out.append(torch.cat(pooled).mean(0))
    return torch.stack(out)


@torch.no_grad()
def _set_columns(gate: NoisyTopKGate, centroids: torch.Tensor, scale: float) -> None:
    """Gate columns: the unit-length domain centroids (and their mean for a last, base expert)."""
    n = gate.num_experts
    if centroids.shape[0] < n:  # SMoE: the base FFN is the last expert, its centroid the mean of all
        centroids = torch.cat([centroids, centroids.mean(0, keepdim=True)])
    if centroids.shape[1] != gate.w_gate.shape[0]:
        raise ValueError(
            f"a router reads {gate.w_gate.shape[0]} features but the centroids have {centroids.shape[1]}; "
            "cheap_embed needs merge.router_scope=block"
        )
    gate.w_gate.copy_(scale * F.normalize(centroids, dim=1).t().to(gate.w_gate.dtype))
    gate.w_noise.zero_()


def initialise(
    model: nn.Module, spec: RouterInit, *, tokenizer=None, prompts: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Initialise every router of a composed model as `spec.init` says (see the module doc)."""
    if spec.init == "random":
        return
    if spec.init == "oracle":
        install_oracle(model)
        return
    gates = [r.gate for r in routers(model)]
    if spec.init == "uniform":
        with torch.no_grad():
            for g in gates:
                g.w_gate.zero_()
                g.w_noise.zero_()
        return
    if tokenizer is None or not prompts:
        raise ValueError(f"compose.router.init={spec.init}: needs a tokenizer and prompts for every domain")
    if spec.init == "centroid":
        for g, c in zip(gates, hidden_centroids(model, tokenizer, prompts, spec)):
            _set_columns(g, c, spec.scale)
    else:
        c = embedding_centroids(model, tokenizer, prompts, spec)
        for g in gates:
            _set_columns(g, c, spec.scale)


@torch.no_grad()
def routed_domains(model: nn.Module, tokenizer, texts: Sequence[str], spec: RouterInit) -> torch.Tensor:
    """`[texts, routers]`: the expert each router scores highest for each text (mean over its units)."""
    rs = routers(model)
    captured: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        def post(module, args, out):
            captured.setdefault(index, []).append(out.float())

        return post

    handles = [r.gate.register_forward_hook(hook(i)) for i, r in enumerate(rs)]
    was_training = model.training
    model.eval()
    choices = []
    try:
        for batch in _batches(tokenizer, texts, spec):
            captured.clear()
            _forward(model, batch)
            b = batch["input_ids"].shape[0]
            per_router = [torch.cat(captured[i]).view(b, -1, captured[i][0].shape[-1]).mean(1) for i in range(len(rs))]
            choices.append(torch.stack(per_router, 1).argmax(-1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(choices)
