"""CPU demonstration of camex.compose on real data (the offline MiniLM, shipped domains).

    OMP_NUM_THREADS=1 python scripts/compose_demo.py [--reduced] [--out DIR] [--report DIR]

1. Fine-tunes the MiniLM on a classification task inside each domain (camex.tasks.domains.labelled:
   tweet sentiment, BBC topic, Wikipedia article, standard-library module), FFN-only (FFN + head)
   and full. All domains share one head over the union of their labels; each domain reads only its
   own slice of it (its label set is known at evaluation, its expert is not).
2. Evaluates, per domain: each source expert, the base (with the experts' heads), dense merges of
   the full experts (mean, TIES, DARE), the composed MoE with oracle, centroid and router-trained
   routing, and a short joint fine-tuning of the composed MoE with Domain vs Domain-CA and Ties vs
   Ties-CA merging over several seeds, compared with paired tests over (seed, domain) pairs.

Resumable: every fine-tuned expert is saved under OUT/ckpt and every evaluation under OUT/results
as soon as it is done; a rerun skips what exists. Numbers come from scripts/compose_demo.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import camex  # noqa: E402
from camex.compose import RouterInit, SharedMerge, merge_task_vectors, set_domains  # noqa: E402
from camex.compose.config import train_only_router  # noqa: E402
from camex.models import resolve_source  # noqa: E402
from camex.moe import pop_aux_loss  # noqa: E402
from camex.report.aggregate import Stat  # noqa: E402
from camex.report.significance import Comparison, compare, holm_adjust  # noqa: E402
from camex.tasks.domains import labelled  # noqa: E402


def load_config(reduced: bool) -> dict:
    raw = yaml.safe_load((ROOT / "scripts" / "compose_demo.yaml").read_text())
    cfg = dict(raw["full"])
    if reduced:
        cfg.update(raw["reduced"])
    return cfg


class Results:
    """One JSON file per finished unit of work; a rerun reads them instead of redoing the work."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / (key.replace("/", "__") + ".json")

    def get(self, key: str):
        p = self.path(key)
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, key: str, value) -> None:
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, self.path(key))

    def all(self) -> dict:
        return {p.stem.replace("__", "/"): json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))}


# -- data ------------------------------------------------------------------------------------------


def domain_data(cfg: dict) -> tuple[dict, dict]:
    """`{domain: (train_x, train_y, eval_x, eval_y)}` with labels in the shared label space, and
    `{domain: (offset, count)}`: the domain's slice of the head."""
    data, slices, offset = {}, {}, 0
    rng = np.random.default_rng(cfg["data_seed"])
    for d in cfg["domains"]:
        xs, ys, names = labelled(d)
        order = rng.permutation(len(xs))
        n_tr, n_ev = cfg["train_per_domain"], cfg["eval_per_domain"]
        tr, ev = order[:n_tr], order[n_tr : n_tr + n_ev]
        data[d] = ([xs[i] for i in tr], [offset + ys[i] for i in tr], [xs[i] for i in ev], [offset + ys[i] for i in ev])
        slices[d] = (offset, len(names))
        offset += len(names)
    return data, slices


def restrict(logits: torch.Tensor, domain_ids: list[int], slices: list[tuple[int, int]]) -> torch.Tensor:
    """Logits outside each example's domain slice set to −inf."""
    mask = torch.full_like(logits, -math.inf)
    for i, d in enumerate(domain_ids):
        start, count = slices[d]
        mask[i, start : start + count] = 0.0
    return logits + mask


# -- training and evaluation ----------------------------------------------------------------------


def train(model, tokenizer, batches, params, *, steps: int, lr: float, slices, cfg, head_lr=None, seed=0) -> None:
    """AdamW with a linear decay, cross-entropy on each example's domain slice (+ the MoE aux loss)."""
    torch.manual_seed(seed)
    head = {id(p) for n, p in model.named_parameters() if n.startswith("classifier")}
    groups = [{"params": [p for p in params if id(p) not in head], "lr": lr}]
    if head_lr is not None:
        groups.append({"params": [p for p in params if id(p) in head], "lr": head_lr})
    else:
        groups[0]["params"] = list(params)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    for step in range(steps):
        texts, labels, domains = batches(step)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg["max_length"], return_tensors="pt")
        logits = model(**enc).logits
        loss = torch.nn.functional.cross_entropy(restrict(logits, domains, slices), torch.tensor(labels))
        aux = pop_aux_loss(model)
        if aux is not None:
            loss = loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def sampler(data: dict, domains: list[str], cfg: dict, seed: int):
    """Batches drawn at random from the training sets of `domains` (mixed)."""
    pool = [(x, y, cfg["domains"].index(d)) for d in domains for x, y in zip(data[d][0], data[d][1])]
    rng = np.random.default_rng(seed)

    def batches(step: int):
        pick = rng.choice(len(pool), size=min(cfg["batch_size"], len(pool)), replace=False)
        return [pool[i][0] for i in pick], [pool[i][1] for i in pick], [pool[i][2] for i in pick]

    return batches


@torch.no_grad()
def evaluate(model, tokenizer, data, slices, cfg, *, oracle: bool = False) -> dict[str, float]:
    model.eval()
    out = {}
    for di, d in enumerate(cfg["domains"]):
        _, _, xs, ys = data[d]
        correct = 0
        for s in range(0, len(xs), cfg["eval_batch_size"]):
            chunk = xs[s : s + cfg["eval_batch_size"]]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=cfg["max_length"], return_tensors="pt")
            if oracle:
                set_domains(model, [di] * len(chunk))
            logits = restrict(model(**enc).logits, [di] * len(chunk), slices)
            correct += (logits.argmax(-1) == torch.tensor(ys[s : s + len(chunk)])).sum().item()
        out[d] = correct / len(xs)
    out["mean"] = float(np.mean([out[d] for d in cfg["domains"]]))
    return out


# -- the steps ------------------------------------------------------------------------------------


def ffn_parameter_names(model) -> set[str]:
    from camex import MoEOptions
    from camex.upcycle import plan_for

    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for site in plan_for(model, MoEOptions()).sites:
        stem = f"{names[id(site.parent)]}.{site.attr}"
        out |= {f"{stem}.weight", f"{stem}.bias"}
    return out


def save_atomic(model, tokenizer, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)  # a killed save leaves only the .partial folder, redone on the next run


def run(cfg: dict, out: Path, log) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification

    results = Results(out / "results")
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    data, slices_by_domain = domain_data(cfg)
    slices = [slices_by_domain[d] for d in cfg["domains"]]
    n_labels = sum(c for _, c in slices)
    minilm = resolve_source(cfg["base"], "base")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    base_dir = ckpt / "base"
    if not base_dir.exists():  # the base with the shared head, the same initial head for every expert
        torch.manual_seed(cfg["data_seed"])
        save_atomic(BertForSequenceClassification.from_pretrained(minilm, num_labels=n_labels), tokenizer, base_dir)

    experts: dict[str, dict[str, str]] = {"ffn": {}, "full": {}}
    for mode in ("ffn", "full"):
        for d in cfg["domains"]:
            path = ckpt / f"{mode}_{d}"
            experts[mode][d] = str(path)
            if path.exists():
                continue
            t0 = time.time()
            model = BertForSequenceClassification.from_pretrained(base_dir)
            ffn = ffn_parameter_names(model)
            params = [
                p for n, p in model.named_parameters() if mode == "full" or n in ffn or n.startswith("classifier")
            ]
            train(model, tokenizer, sampler(data, [d], cfg, cfg["data_seed"]), params, steps=cfg["expert_steps"],
                  lr=cfg["expert_lr"], head_lr=cfg["head_lr"], slices=slices, cfg=cfg)  # fmt: skip
            save_atomic(model, tokenizer, path)
            log(f"fine-tuned {mode} expert {d} in {time.time() - t0:.0f} s")

    def once(key: str, fn):
        if results.get(key) is None:
            t0 = time.time()
            results.put(key, fn())
            log(f"{key}: {results.get(key)} ({time.time() - t0:.0f} s)")
        return results.get(key)

    for mode in ("ffn", "full"):
        for d in cfg["domains"]:
            once(f"expert/{mode}/{d}", lambda p=experts[mode][d]: evaluate(
                BertForSequenceClassification.from_pretrained(p), tokenizer, data, slices, cfg))  # fmt: skip

    def dense(method: str, head_only: bool = False) -> dict:
        """A dense merge of the full experts' state dicts (tensor by tensor, camex.compose.shared)."""
        model = BertForSequenceClassification.from_pretrained(base_dir)
        theta = model.state_dict()
        sds = [BertForSequenceClassification.from_pretrained(p).state_dict() for p in experts["full"].values()]
        spec = SharedMerge(method, **({} if method in ("mean", "task_arithmetic") else cfg["dense_merge"]))
        if method == "task_arithmetic":
            spec = SharedMerge(method, lam=1.0)
        g = torch.Generator().manual_seed(cfg["data_seed"])
        merged = {}
        for k, v in theta.items():
            if not v.is_floating_point() or (head_only and not k.startswith("classifier")):
                merged[k] = v
                continue
            merged[k] = merge_task_vectors(
                v.float(), torch.stack([sd[k].float() - v.float() for sd in sds]), spec, generator=g
            )
        model.load_state_dict(merged)
        return evaluate(model, tokenizer, data, slices, cfg)

    once("base_with_expert_heads", lambda: dense("task_arithmetic", head_only=True))
    for method in ("mean", "ties", "dare"):
        once(f"dense/{method}", lambda m=method: dense(m))

    prompts = {d: data[d][0][: cfg["prompts_per_domain"]] for d in cfg["domains"]}
    options = camex.MoEOptions(router_scope="block")
    # FFN-only experts differ from the base in their FFNs and their head slices only: task arithmetic
    # with λ = 1 gives every domain its own head slice back, so oracle routing reproduces each expert.
    shared_by_mode = {"ffn": SharedMerge("task_arithmetic", lam=1.0), "full": SharedMerge(**cfg["moe_shared"])}

    def moe(mode: str, init: str, variant: str = "domain", seed: int = 0):
        spec = RouterInit(init, max_length=cfg["max_length"])
        return camex.compose(str(base_dir), experts[mode], shared=shared_by_mode[mode], router=spec, variant=variant,
                             options=options, prompts=prompts, tokenizer=tokenizer, seed=seed)  # fmt: skip

    for mode in ("ffn", "full"):
        once(f"moe/{mode}/oracle", lambda m=mode: evaluate(moe(m, "oracle"), tokenizer, data, slices, cfg, oracle=True))
        once(f"moe/{mode}/centroid", lambda m=mode: evaluate(moe(m, "centroid"), tokenizer, data, slices, cfg))

    def router_trained(seed: int) -> dict:
        model = moe("ffn", "centroid", seed=seed)
        train_only_router(model)
        params = [p for p in model.parameters() if p.requires_grad]
        train(model, tokenizer, sampler(data, cfg["domains"], cfg, seed), params, steps=cfg["router_steps"],
              lr=cfg["router_lr"], slices=slices, cfg=cfg, seed=seed)  # fmt: skip
        return evaluate(model, tokenizer, data, slices, cfg)

    def joint(variant: str, seed: int) -> dict:
        model = moe("full", "centroid", variant=variant, seed=seed)
        train(model, tokenizer, sampler(data, cfg["domains"], cfg, seed), list(model.parameters()),
              steps=cfg["joint_steps"], lr=cfg["joint_lr"], slices=slices, cfg=cfg, seed=seed)  # fmt: skip
        return evaluate(model, tokenizer, data, slices, cfg)

    for seed in cfg["seeds"]:
        once(f"moe/ffn/router_trained/seed{seed}", lambda s=seed: router_trained(s))
        for variant in cfg["joint_variants"]:
            once(f"joint/{variant}/seed{seed}", lambda v=variant, s=seed: joint(v, s))
    return results.all()


# -- report ---------------------------------------------------------------------------------------


def twin_tests(res: dict, cfg: dict) -> list[tuple[str, str, Comparison]]:
    """Each curvature-aware joint run against its Euclidean twin, paired by seed (the twins share
    the composed start and the data order), on the mean over domains and on each domain; the
    t-test p-values Holm-adjusted over all of them (camex.report.significance)."""
    seeds = [str(s) for s in cfg["seeds"]]
    out = []
    for a, b in cfg["pairs"]:  # (euclidean, curvature-aware)
        for d in ("mean", *cfg["domains"]):

            def stat(variant: str, d: str = d) -> Stat:
                values = tuple(res[f"joint/{variant}/seed{s}"][d] for s in seeds)
                return Stat(values=values, seeds=tuple(seeds), run_ids=())

            out.append((f"{b} − {a}", d, compare(stat(b), stat(a))))
    adjusted = holm_adjust([c for _, _, c in out])
    return [(name, d, c) for (name, d, _), c in zip(out, adjusted)]


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def report(cfg: dict, res: dict) -> tuple[str, dict]:
    domains = cfg["domains"]
    rows = []

    def row(name: str, values: list[dict]) -> None:
        cells = [np.mean([v[d] for v in values]) for d in [*domains, "mean"]]
        spread = f" ± {np.std([v['mean'] for v in values]):.3f}" if len(values) > 1 else ""
        rows.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f"{spread} |")

    for mode in ("full", "ffn"):
        for d in domains:
            row(f"expert {d} ({mode})", [res[f"expert/{mode}/{d}"]])
    row("base (encoder) + experts' heads", [res["base_with_expert_heads"]])
    for m in ("mean", "ties", "dare"):
        row(f"dense merge of full experts: {m}", [res[f"dense/{m}"]])
    for mode in ("ffn", "full"):
        for r in ("oracle", "centroid"):
            row(f"MoE from {mode} experts, {r} routing", [res[f"moe/{mode}/{r}"]])
    seeds = cfg["seeds"]
    row(
        f"MoE from ffn experts, router-trained ({len(seeds)} seeds)",
        [res[f"moe/ffn/router_trained/seed{s}"] for s in seeds],
    )
    for v in cfg["joint_variants"]:
        row(f"joint fine-tuning, {v} ({len(seeds)} seeds)", [res[f"joint/{v}/seed{s}"] for s in seeds])
    stats_, lines = {}, []
    for name, d, c in twin_tests(res, cfg):
        ci = "–" if c.ci is None else f"{c.ci[0]:+.4f} to {c.ci[1]:+.4f}"
        lines.append(f"| {name} | {d} | {c.kind} | {c.n} | {_num(c.difference, '+.4f')} | {ci} | "
                     f"{_num(c.p)} | {_num(c.p_sign)} | {_num(c.p_holm)} | {c.mark} |")  # fmt: skip
        stats_[f"{name} {d}"] = {"kind": c.kind, "n": c.n, "mean_diff": c.difference, "differences": c.differences,
                                 "ci": c.ci, "t_p": c.p, "sign_p": c.p_sign, "holm_p": c.p_holm}  # fmt: skip
    head = "| model | " + " | ".join([*domains, "mean"]) + " |\n|---|" + "---|" * (len(domains) + 1)
    text = (
        "# camex.compose demonstration (MiniLM, CPU)\n\n"
        f"Accuracy on {cfg['eval_per_domain']} held-out texts per domain (label set of the domain known). "
        f"Config: `scripts/compose_demo.yaml`.\n\n{head}\n" + "\n".join(rows) + "\n\n"
        "Curvature-aware against Euclidean after the short joint fine-tuning, paired by seed (the twins "
        "share the composed start and the data order): mean of the per-seed differences with its 95 % t "
        "interval, paired t-test, exact sign test, Holm over every row of this table; `identical`: "
        "bit-identical accuracies on every seed (no test).\n\n"
        "| difference | accuracy on | test | seeds | mean Δ | 95 % CI | paired t p | sign p | Holm p | mark |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    return text, stats_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the CI smoke run: few texts, steps and seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "compose_demo")
    parser.add_argument("--report", type=Path, default=None, help="also write report.md + results.json here")
    args = parser.parse_args()
    cfg = load_config(args.reduced)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f} s] {msg}", flush=True)

    res = run(cfg, args.out, log)
    text, stats_ = report(cfg, res)
    for folder in filter(None, (args.out, args.report)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
        (folder / "results.json").write_text(json.dumps({"config": cfg, "results": res, "paired": stats_}, indent=1))
    print(text)
    log("done")


if __name__ == "__main__":
    main()
