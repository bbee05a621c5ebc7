"""CPU demonstration of MergeME on decoder LMs: routing without MoE fine-tuning, merged vs separate
attention, and a heterogeneous MoE (MERGEME.md §2.2-2.3; docs/heuristic_routing.md).

    OMP_NUM_THREADS=1 python scripts/lm_compose_demo.py [--reduced] [--out DIR] [--report DIR]

1. Continued-trains a truncated SmolLM2 (model=smollm2_2l) on each of three shipped text domains
   (camex.tasks.domains: BBC news, Wikipedia, standard-library Python), and a shallower copy (its
   first block) on one of them.
2. Composes the experts with the base (camex.compose: TIES shared weights, FFN experts) and reports
   per-domain perplexity on held-out text of the base, each dense expert and the composed MoE
   routed per sequence at random, by perplexity, by task vector and by the known domain (oracle),
   with merged attention and with separate attention, plus how often each routing picked the
   domain's expert and its extra cost.
3. Builds the heterogeneous MoE of a full-depth and a shallow expert (camex.compose.hetero) and
   fine-tunes it briefly on their two domains.

Resumable: experts are saved under OUT/ckpt and every evaluation under OUT/results as soon as it is
done; a rerun skips what exists. Numbers come from scripts/lm_compose_demo.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from compose_demo import Results, save_atomic  # noqa: E402

import camex  # noqa: E402
from camex import models  # noqa: E402
from camex.compose import RouterInit, SharedMerge  # noqa: E402
from camex.compose.hetero import from_checkpoints  # noqa: E402
from camex.compose.heuristic import (  # noqa: E402
    HeuristicRouting,
    RoutingCost,
    install_sequence_weights,
    route,
    set_sequence_weights,
    task_vectors,
    topk_softmax,
)
from camex.compose.separate import separate_attention  # noqa: E402
from camex.tasks.domains import texts  # noqa: E402


def load_config(reduced: bool) -> dict:
    raw = yaml.safe_load((ROOT / "scripts" / "lm_compose_demo.yaml").read_text())
    cfg = dict(raw["full"])
    if reduced:
        cfg.update(raw["reduced"])
    return cfg


def model_config(cfg: dict) -> dict:
    """conf/model/<cfg.model>.yaml."""
    return yaml.safe_load((ROOT / "conf" / "model" / f"{cfg['model']}.yaml").read_text())


# -- data ------------------------------------------------------------------------------------------


def blocks(tokenizer, items: list[str], size: int) -> torch.Tensor:
    """The texts tokenized, joined with the end-of-text token and cut into `[n, size]` blocks."""
    ids: list[int] = []
    for t in items:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // size
    return torch.tensor(ids[: n * size]).view(n, size)


def domain_data(cfg: dict, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{domain: (train blocks, eval blocks)}`; eval blocks come from held-out texts only."""
    out = {}
    for d in cfg["domains"]:
        pool = texts(d, cfg["texts_per_domain"], seed=cfg["seed"])
        held = cfg["eval_texts"]
        train, ev = blocks(tokenizer, pool[held:], cfg["block_size"]), blocks(tokenizer, pool[:held], cfg["block_size"])
        if len(ev) < cfg["eval_blocks"]:
            raise SystemExit(f"domain {d}: {len(ev)} eval blocks, fewer than eval_blocks={cfg['eval_blocks']}")
        out[d] = (train, ev[: cfg["eval_blocks"]])
    return out


# -- training and evaluation ----------------------------------------------------------------------


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, labels=ids)
    return out["loss"] if isinstance(out, dict) else out.loss


def train(model, pools: list[torch.Tensor], *, steps: int, lr: float, batch: int, seed: int) -> list[float]:
    """AdamW with a linear decay on random blocks of `pools` (mixed); returns the losses."""
    g = torch.Generator().manual_seed(seed)
    data = torch.cat(pools)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, data[torch.randint(0, len(data), (batch,), generator=g)])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def perplexities(model, data: dict, cfg: dict, weights=None) -> dict[str, float]:
    """Per-domain perplexity (exp of the mean token NLL over the eval blocks); `weights(domain, ids)`
    sets each sequence's routing before its forward pass."""
    out = {}
    for d in cfg["domains"]:
        ev = data[d][1]
        nll = []
        for s in range(0, len(ev), cfg["batch_size"]):
            ids = ev[s : s + cfg["batch_size"]]
            if weights is not None:
                weights(d, ids)
            logits = model(input_ids=ids)["logits"][:, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"))
        out[d] = math.exp(float(torch.cat(nll).mean()))
    out["mean"] = math.exp(float(np.mean([math.log(out[d]) for d in cfg["domains"]])))  # geometric mean
    return out


# -- the steps ------------------------------------------------------------------------------------


def run(cfg: dict, out: Path, log) -> dict:
    from transformers import AutoModelForCausalLM

    results = Results(out / "results")
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(model_config(cfg))
    data = domain_data(cfg, tokenizer)
    domains = cfg["domains"]

    def once(key: str, fn):
        if results.get(key) is None:
            t0 = time.time()
            value = fn()
            results.put(key, {**value, "seconds": round(time.time() - t0, 1)})
            log(f"{key}: {results.get(key)}")
        return results.get(key)

    base, shallow = str(ckpt / "base"), str(ckpt / "base_shallow")
    if not Path(base).exists():
        model = models.build_model(model_config(cfg), head="causal_lm", num_labels=0, tokenizer=tokenizer)
        save_atomic(model, tokenizer, Path(base))
    if not Path(shallow).exists():  # its first blocks: the same truncation, without reading the GGUF file again
        model = AutoModelForCausalLM.from_pretrained(base)
        model.model.layers = model.model.layers[: cfg["shallow_layers"]]
        model.config.num_hidden_layers = cfg["shallow_layers"]
        save_atomic(model, tokenizer, Path(shallow))
    experts = {d: str(ckpt / f"expert_{d}") for d in domains}
    trained = {f"expert/{d}": (base, d, experts[d]) for d in domains}
    hd = cfg["hetero_domains"]
    trained[f"shallow/{hd[1]}"] = (shallow, hd[1], str(ckpt / f"shallow_{hd[1]}"))
    for key, (start, d, path) in trained.items():
        if Path(path).exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(start)
        t0 = time.time()
        losses = train(model, [data[d][0]], steps=cfg["expert_steps"], lr=cfg["expert_lr"], batch=cfg["batch_size"],
                       seed=cfg["seed"])  # fmt: skip
        save_atomic(model, tokenizer, Path(path))
        results.put(f"train/{key}", {"first_loss": losses[0], "last_loss": losses[-1],
                                     "seconds": round(time.time() - t0, 1)})  # fmt: skip
        log(f"trained {key}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    dense = {"base": base, **{f"expert/{d}": experts[d] for d in domains}}
    dense[f"shallow/{hd[1]}"] = trained[f"shallow/{hd[1]}"][2]
    for name, path in dense.items():
        once(f"dense/{name}", lambda p=path: perplexities(AutoModelForCausalLM.from_pretrained(p).eval(), data, cfg))

    sources = [AutoModelForCausalLM.from_pretrained(experts[d]).eval() for d in domains]
    base_lm = AutoModelForCausalLM.from_pretrained(base).eval()
    taus = task_vectors(base_lm, sources)

    def composed():
        return camex.compose(base, experts, shared=SharedMerge(**cfg["shared"]), router=RouterInit("random"),
                             variant=cfg["variant"], seed=cfg["seed"]).eval()  # fmt: skip

    moes = {"merged": composed(), "separate": separate_attention(composed(), sources)}
    install_sequence_weights(moes["merged"])

    for method, k in cfg["routings"]:
        keys = {a: f"moe/{a}/{method}/top{k}" for a in moes}
        if all(results.get(key) is not None for key in keys.values()):
            continue
        # the weights depend on the sources only: computed once (cost counted once), used by both MoEs
        cost, g, t0 = RoutingCost(), torch.Generator().manual_seed(cfg["seed"]), time.time()
        weights: dict[str, list[torch.Tensor]] = {}
        for di, d in enumerate(domains):
            ev, n = data[d][1], len(domains)
            for s in range(0, len(ev), cfg["batch_size"]):
                ids = ev[s : s + cfg["batch_size"]]
                if method == "random":
                    w = topk_softmax(torch.rand(len(ids), n, generator=g), k)
                elif method == "oracle":
                    w = torch.nn.functional.one_hot(torch.full((len(ids),), di), n).float()
                else:
                    w = route(HeuristicRouting(method, top_k=k), ids, sources=sources, base=base_lm, taus=taus,
                              cost=cost)  # fmt: skip
                weights.setdefault(d, []).append(w)
        routing_seconds = round(time.time() - t0, 1)
        picked = float(np.mean([(w.argmax(1) == domains.index(d)).float().mean() for d in domains
                                for w in weights[d]]))  # fmt: skip
        for attention, moe in moes.items():
            batches = {d: iter(ws) for d, ws in weights.items()}

            def use(d: str, ids: torch.Tensor, moe=moe, batches=batches) -> None:
                set_sequence_weights(moe, next(batches[d]))

            def evaluate(moe=moe, use=use, picked=picked, cost=cost, seconds=routing_seconds) -> dict:
                res = perplexities(moe, data, cfg, use)
                res["picked_domain_expert"] = picked
                res["routing_cost"] = {k_: v for k_, v in cost.as_dict().items() if k_ != "per_source"}
                res["routing_seconds"] = seconds
                return res

            once(keys[attention], evaluate)

    def hetero() -> dict:
        pair = {hd[0]: experts[hd[0]], hd[1]: trained[f"shallow/{hd[1]}"][2]}
        torch.manual_seed(cfg["seed"])
        moe = from_checkpoints(pair, top_k=cfg["hetero_top_k"]).eval()
        before = perplexities(moe, data, cfg)
        losses = train(moe, [data[d][0] for d in hd], steps=cfg["hetero_steps"], lr=cfg["hetero_lr"],
                       batch=cfg["batch_size"], seed=cfg["seed"])  # fmt: skip
        after = perplexities(moe, data, cfg)
        depths = [len(m.layers) for m in moe.experts]
        return {"before": before, "after": after, "first_loss": losses[0], "last_loss": losses[-1],
                "experts": {d: f"{n} block{'s' * (n > 1)}" for d, n in zip(hd, depths)}}  # fmt: skip

    once("hetero", hetero)
    return results.all()


# -- report ---------------------------------------------------------------------------------------


def report(cfg: dict, res: dict) -> str:
    domains = cfg["domains"]
    head = "| model | " + " | ".join([*domains, "geo. mean"]) + " |\n|---|" + "---|" * (len(domains) + 1)

    def cells(r: dict) -> str:
        return " | ".join(f"{r[d]:.1f}" for d in [*domains, "mean"])

    hd = cfg["hetero_domains"]
    depth = int(res["hetero"]["experts"][hd[0]].split()[0])
    rows = [f"| base ({cfg['model']}, no training) | {cells(res['dense/base'])} |"]
    rows += [f"| dense expert {d} | {cells(res[f'dense/expert/{d}'])} |" for d in domains]
    shallow = res[f"dense/shallow/{hd[1]}"]
    rows.append(f"| dense shallow expert {hd[1]} ({cfg['shallow_layers']} of {depth} blocks) | {cells(shallow)} |")
    routed = []
    for attention in ("merged", "separate"):
        for method, k in cfg["routings"]:
            r = res[f"moe/{attention}/{method}/top{k}"]
            rows.append(f"| MoE, {attention} attention, {method} routing, top-{k} | {cells(r)} |")
    for method, k in cfg["routings"]:
        r = res[f"moe/merged/{method}/top{k}"]  # the same weights drive both attentions
        c = r["routing_cost"]
        routed.append(f"| {method} | {k} | {r['picked_domain_expert']:.2f} | {c['forwards']} | {c['backwards']} | "
                      f"{c['tokens']} | {c['flops']:.3g} | {r['routing_seconds']} |")  # fmt: skip
    h = res["hetero"]
    rows.append(f"| heterogeneous MoE ({', '.join(f'{d}: {v}' for d, v in h['experts'].items())}), "
                f"before fine-tuning | {cells(h['before'])} |")  # fmt: skip
    rows.append(f"| heterogeneous MoE after {cfg['hetero_steps']} steps on {' + '.join(hd)} | {cells(h['after'])} |")
    train_rows = [f"| {k.removeprefix('train/')} | {v['first_loss']:.3f} | {v['last_loss']:.3f} | {v['seconds']} |"
                  for k, v in res.items() if k.startswith("train/")]  # fmt: skip
    return (
        f"# MergeME on decoder LMs: routing without fine-tuning, separate attention, heterogeneous experts (CPU)\n\n"
        f"Perplexity on {cfg['eval_blocks']} held-out blocks of {cfg['block_size']} tokens per domain (texts never "
        f"trained on). Experts: `{cfg['model']}` continued-trained for {cfg['expert_steps']} steps of "
        f"{cfg['batch_size']} blocks on one domain each; MoE: `camex.compose` of base + experts, shared weights "
        f"{cfg['shared']['method']} (λ = {cfg['shared']['lam']:.3g}, p = {cfg['shared']['keep']}), variant "
        f"`{cfg['variant']}`, no MoE fine-tuning; routing per sequence (temperature 1). Config: "
        f"`scripts/lm_compose_demo.yaml`; this invocation took {res['wall']['seconds']:.0f} s wall on "
        f"{res['wall']['threads']} thread(s) (a rerun reuses what an earlier one saved).\n\n"
        f"{head}\n" + "\n".join(rows) + "\n\n"
        "Routing: share of held-out sequences whose largest weight went to their own domain's expert, and "
        "the extra passes it cost for all of them, computed once and used by both attentions "
        "(perplexity: one forward per source; task vector: one forward and "
        "backward of the base per sequence; FLOPs 2 per parameter per token forward, 6 with backward).\n\n"
        "| routing | top-k | picked own expert | forwards | backwards | tokens | FLOPs | s |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "\n".join(routed) + "\n\n"
        "Training (loss of the first and last step, seconds):\n\n| model | first | last | s |\n|---|---|---|---|\n"
        + "\n".join(train_rows)
        + f"\n| heterogeneous MoE | {h['first_loss']:.3f} | {h['last_loss']:.3f} | {res['hetero']['seconds']} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the CI smoke run: few texts and steps")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "compose_lm_demo")
    parser.add_argument("--report", type=Path, default=None, help="also write report.md + results.json here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.reduced)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f} s] {msg}", flush=True)

    res = run(cfg, args.out, log)
    res["wall"] = {"seconds": round(time.time() - started, 1), "threads": args.threads}  # this invocation
    text = report(cfg, res)
    for folder in filter(None, (args.out, args.report)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
        (folder / "results.json").write_text(json.dumps({"config": cfg, "results": res}, indent=1))
    print(text)
    log("done")


if __name__ == "__main__":
    main()
