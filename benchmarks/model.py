"""Model benchmark: training tokens per second of whole upcycled models, dense against each variant.

    python -m benchmarks.model                        # tiny T5 and GPT-2 configs, every variant
    python -m benchmarks.model --base --models gpt2   # GPT-2 (124M) shape, random init: slow on CPU
    python -m benchmarks.model --device cuda --base   # adds MFU
    python -m benchmarks.model --models bert --base --variants dense domain camex   # MiniLM-L6 shape

Models are built from `transformers` configs with random weights (no hub access) and upcycled with
`camex.upcycle` (n = 7, r = 1 unless told). One step is forward, backward and an AdamW update on a
fixed random batch. Tokens per step: encoder plus decoder positions for T5, sequence positions for
GPT-2 and BERT. `bert` is a sequence classifier; its base size is MiniLM-L6's shape (the
project's pretrained text model: 6 layers, width 384, FFN 1536), 16 sequences of 128 tokens, one
routed unit per sequence. Tiny configs, and the MiniLM shape, are timed in interleaved rounds over
all variants (see `benchmarks.common`); T5-base and GPT-2 (124M) do not fit side by side, so each
variant is built, timed and freed in turn (`--sequential`, the default for them), dense first.

FLOPs per token are counted on one extra training step (forward and backward, not the optimizer)
with `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix products the
implementation really issues (the curvature's recomputation included). MFU = counted FLOPs per
second / peak FLOPs of the device: a table of known GPUs by dtype (`--peak-tflops` overrides),
none on CPU unless `--peak-tflops` is given.
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Case,
    add_clock,
    add_host_memory,
    apply_process_settings,
    environment,
    markdown_table,
    pick_device,
    round_ratio,
    save,
    sync,
    time_cases,
)
from camex import MoEOptions, list_variants, upcycle  # noqa: E402
from camex.accounting import count_parameters  # noqa: E402

# dense peak TFLOPs by (device name fragment, dtype); fp32 uses TF32 tensor cores when allowed
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0,
    ("H200", "float16"): 989.0,
    ("H200", "tf32"): 494.5,
    ("H200", "float32"): 66.9,
    ("H100", "bfloat16"): 989.0,
    ("H100", "float16"): 989.0,
    ("H100", "tf32"): 494.5,
    ("H100", "float32"): 66.9,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float16"): 312.0,
    ("A100", "tf32"): 156.0,
    ("A100", "float32"): 19.5,
}

SIZES = {
    ("t5", "tiny"): dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4, vocab_size=512),
    ("t5", "base"): dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128),
    ("gpt2", "tiny"): dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=256),
    ("gpt2", "base"): dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    ("bert", "tiny"): dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512
    ),
    ("bert", "base"): dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522
    ),
}
SIDE_BY_SIDE_BASE = {"bert"}  # base-size families small enough to time in interleaved rounds
# batch, source length (T5) or sequence length (GPT-2), target length (T5), segment length (GPT-2)
BATCHES = {
    ("t5", "tiny"): dict(batch=8, length=64, target=16),
    ("t5", "base"): dict(batch=16, length=128, target=32),
    ("gpt2", "tiny"): dict(batch=4, length=128, segment=32),
    ("gpt2", "base"): dict(batch=4, length=1024, segment=256),
    ("bert", "tiny"): dict(batch=8, length=64),
    ("bert", "base"): dict(batch=16, length=128),
}


def build_model(family: str, size: str) -> torch.nn.Module:
    import transformers

    cfg = SIZES[(family, size)]
    if family == "t5":
        config = transformers.T5Config(
            **cfg, num_decoder_layers=cfg["num_layers"], dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0
        )
        return transformers.T5ForConditionalGeneration(config)
    if family == "bert":
        config = transformers.BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        return transformers.BertForSequenceClassification(config)
    config = transformers.GPT2Config(
        **cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def make_batch(family: str, size: str, device: torch.device, overrides: dict) -> tuple[dict, int]:
    spec = {**BATCHES[(family, size)], **{k: v for k, v in overrides.items() if v}}
    vocab = SIZES[(family, size)]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (spec["batch"], spec["length"]), generator=g)
    if family == "t5":
        labels = torch.randint(2, vocab, (spec["batch"], spec["target"]), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        tokens = ids.numel() + labels.numel()
    elif family == "bert":
        labels = torch.randint(0, 3, (spec["batch"],), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        tokens = ids.numel()
    else:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        tokens = ids.numel()
    return {k: v.to(device) for k, v in batch.items()}, tokens


def options(family: str, size: str, args, overrides: dict) -> MoEOptions:
    segment = overrides.get("segment") or BATCHES[(family, size)].get("segment", 256)
    return MoEOptions(num_experts=args.experts, rank=args.rank, segment_len=segment)


def train_step(model: torch.nn.Module, batch: dict, dtype: torch.dtype, device: torch.device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = dtype != torch.float32

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        opt.step()

    return run


def count_flops(model: torch.nn.Module, batch: dict, dtype: torch.dtype, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:  # the compiled CPU kernels step aside under it
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)
    if key is None:
        key = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "float32"
    for (fragment, kind), tflops in PEAK_TFLOPS.items():
        if fragment in name and kind == key:
            return tflops * 1e12
    return None


def run_family(family: str, size: str, variants: list[str], device, dtype, args, overrides) -> dict:
    batch, tokens = make_batch(family, size, device, overrides)
    peak = peak_flops(device, dtype, args.peak_tflops)
    sequential = args.sequential or (size == "base" and family not in SIDE_BY_SIDE_BASE)
    rows: dict[str, dict] = {}
    cases: list[Case] = []

    def prepare(variant: str) -> Case:
        torch.manual_seed(0)
        model = upcycle(build_model(family, size), variant, options(family, size, args, overrides)).to(device)
        model.train()
        info = {"parameters": count_parameters(model), "flops": count_flops(model, batch, dtype, device)}
        return Case(variant, train_step(model, batch, dtype, device), info={**info, "model": model})

    if sequential:
        for variant in variants:
            case = prepare(variant)
            time_cases([case], device, warmup=args.warmup, repeats=args.repeats)
            case.info.pop("model")
            cases.append(case)
            del case.run
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        cases = [prepare(v) for v in variants]
        time_cases(cases, device, warmup=args.warmup, repeats=args.repeats)
    sync(device)
    by = {c.name: c for c in cases}

    def relative(c: Case, ref: str) -> float | None:
        if ref not in by:
            return None
        if sequential:  # different periods: the best one can do is a ratio of medians
            return c.median_ms / by[ref].median_ms
        return round_ratio(c, by[ref])

    for c in cases:
        flops_per_step = c.info["flops"]
        rows[c.name] = {
            "median_ms": c.median_ms,
            "times_ms": c.times_ms,
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / (c.median_ms / 1e3),
            "x_dense_time": relative(c, "dense"),
            "x_domain_time": relative(c, "domain"),  # issue 20's target: camex <= 1.2x domain
            "counted_flops_per_token": flops_per_step / tokens,
            "mfu": None if peak is None else flops_per_step / (c.median_ms / 1e3) / peak,
            "parameters": c.info["parameters"],
        }
    return {
        "family": family,
        "size": size,
        "batch": {**BATCHES[(family, size)], **{k: v for k, v in overrides.items() if v}},
        "tokens_per_step": tokens,
        "sequential": sequential,
        "peak_flops": peak,
        "variants": rows,
    }


def table(result: dict) -> str:
    title = (
        f"**{result['family']} ({result['size']})**: {result['tokens_per_step']} tokens per step, "
        f"batch {result['batch']}" + (" (variants timed one after another)" if result["sequential"] else "")
    )
    rows = [
        [
            name,
            r["median_ms"],
            r["tokens_per_s"],
            r["x_dense_time"],
            r.get("x_domain_time"),
            r["counted_flops_per_token"] / 1e6,
            None if r["mfu"] is None else 100 * r["mfu"],
            r["parameters"]["total"] / 1e6,
        ]
        for name, r in result["variants"].items()
    ]
    headers = ["variant", "step ms", "tokens/s", "× dense time", "× domain time", "MFLOP/token", "MFU %", "params (M)"]
    return title + "\n\n" + markdown_table(headers, rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", nargs="+", default=["t5", "gpt2"], choices=["t5", "gpt2", "bert"])
    p.add_argument("--variants", nargs="+", default=list_variants(), choices=list_variants())
    p.add_argument("--base", action="store_true", help="T5-base / GPT-2 (124M) / MiniLM-L6 sizes, not tiny")
    p.add_argument("--sequential", action="store_true", help="time variants one after another")
    p.add_argument("--experts", type=int, default=7)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, in TFLOP/s")
    p.add_argument("--threads", type=int, default=None)
    add_clock(p)
    add_host_memory(p)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    apply_process_settings(args)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    size = "base" if args.base else "tiny"
    overrides = {"batch": args.batch, "length": args.length}
    results = {
        "benchmark": "model",
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "models": {},
    }
    for family in args.models:
        result = run_family(family, size, args.variants, device, dtype, args, overrides)
        results["models"][family] = result
        print(table(result) + "\n", flush=True)
    return save(results, args.out, f"model_{size}_{device.type}.json")


if __name__ == "__main__":
    main()
