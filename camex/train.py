"""One training run: validated config → task data → dense model → upcycle → Trainer → MLflow.

Training uses the transformers Trainer (Seq2SeqTrainer for generative QA): AdamW with our
parameter groups, the configured schedule, evaluation every epoch (or every N steps), the
paper's best-epoch selection (`trainer.select_best`), safetensors checkpoints and `resume=true`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from camex import compose, distributed, faults, footprint, host_memory, models, tasks, tracking
from camex.accounting import count_parameters
from camex.checkpoints import (
    AtomicCheckpoints,
    CheckpointError,
    atomic_write_text,
    publish,
    remove_partial,
    set_aside,
    verified_checkpoints,
)
from camex.compose import config as compose_config
from camex.config import ConfigError, RunSpec, validate
from camex.curvature_log import curvature_callback, first_eval_batch
from camex.optim import parameter_groups
from camex.redact import redact_secrets
from camex.upcycle import upcycle

CONTROL_KEYS = ("resume", "overwrite", "resume_changed")  # how to run, not what is run: never logged as params
CONFIG_RECORD = "run_config.json"  # the effective config (redacted) a resume is compared with
# Keys a resume may change without changing what the run computes: where it is stored and logged,
# how many threads and loader workers it uses, how host memory is allocated, whether a progress bar shows.
RESUME_NEUTRAL = ("paths.", "tracking.", "trainer.threads", "trainer.num_workers", "trainer.progress_bar",
                  "trainer.reuse_host_memory")


class _CamexTrainerMixin:
    """Adds the MoE auxiliary loss to the logs and builds AdamW from `camex.optim` groups."""

    aux_owner: torch.nn.Module | None = None
    decay_curvature = False  # merge.curvature_decay
    _aux_sum = 0.0
    _aux_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        aux = getattr(self.aux_owner, "camex_aux_loss", None)
        if model.training and aux is not None:
            self._aux_sum += float(aux.detach())
            self._aux_count += 1
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._aux_count:
            logs["aux_loss"] = self._aux_sum / self._aux_count
            logs["task_loss"] = logs["loss"] - logs["aux_loss"]
            self._aux_sum, self._aux_count = 0.0, 0
        super().log(logs, start_time)

    score_generations = False  # set from the task (SQuAD windows): return each generation's score too

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        loss, preds, labels = super().prediction_step(
            model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
        )
        if self.score_generations and preds is not None and not prediction_loss_only:
            pad = self.processing_class.pad_token_id
            preds = (preds, generation_scores(model, inputs, preds, pad)[:, None])
        return loss, preds, labels

    def _issue_warnings_after_load(self, load_result) -> None:
        """A tied head (GPT-2's and SmolLM2's `lm_head.weight` is the token embedding) is not in a
        safetensors checkpoint, so loading the best checkpoint lists it as missing although loading
        the embedding restored it: only keys not tied to a loaded tensor are worth the warning."""
        state = self.model.state_dict(keep_vars=True)
        missing = set(load_result.missing_keys)
        loaded = {state[k].data_ptr() for k in state if k not in missing and state[k].numel()}
        tied = {k for k in missing if k in state and state[k].numel() and state[k].data_ptr() in loaded}
        kept = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=kept))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            groups = parameter_groups(model or self.model, args.weight_decay, decay_curvature=self.decay_curvature)
            adamw = torch.optim.AdamW
            ds_config = getattr(args, "hf_deepspeed_config", None)
            if ds_config is not None and ds_config.is_offload():
                # ZeRO-Offload keeps the optimizer on the CPU; DeepSpeed refuses torch's AdamW there
                # (slow), and its own CPU AdamW takes the same parameter groups.
                from deepspeed.ops.adam import DeepSpeedCPUAdam as adamw
            self.optimizer = adamw(
                groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
            )
        return self.optimizer


@torch.no_grad()
def generation_scores(model, inputs: dict, generated: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean token log-probability of each generated answer under `model` (teacher-forced on the
    generation itself): how confident the model is in what it generated, comparable across the
    windows of one question. `generated` starts with the decoder start token and is padded."""
    labels = generated[:, 1:].clone()
    labels[labels == pad_id] = -100
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), labels=labels).logits
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * keep).sum(-1) / keep.sum(-1).clamp(min=1)


def _trainer_classes(seq2seq: bool):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

    base, args = (Seq2SeqTrainer, Seq2SeqTrainingArguments) if seq2seq else (Trainer, TrainingArguments)
    # atomic checkpoint folders, a NaN/inf loss stops the run, and (only when the environment asks)
    # a kill in the middle of a checkpoint save
    mixins = (_CamexTrainerMixin, faults.FiniteLossGuard, AtomicCheckpoints, faults.KillInSave)
    return type("CamexTrainer", (*mixins, base), {}), args


class _TrackerCallback:
    """Forwards every Trainer log line to MLflow at the current optimizer step; when the store
    fails, has the Trainer save a checkpoint after this step and stop (see `Tracker.lost`)."""

    def __new__(cls, tracker: tracking.Tracker):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if not logs:
                    return
                if "train_runtime" in logs:  # the end-of-training summary: a mean, not a step value
                    logs = {f"summary_{k}" if not k.startswith("train_") else k: v for k, v in logs.items()}
                    logs["train_loss_mean"] = logs.pop("train_loss", float("nan"))
                else:
                    logs = {("train_loss" if k == "loss" else k): v for k, v in logs.items()}
                tracker.log_metrics(logs, step=state.global_step)
                if tracker.lost is not None:  # the store stopped answering (after a bounded wait): save, stop
                    control.should_save = True
                    control.should_training_stop = True

        return Callback()


def _step_of(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


def _best_metric_name(prepared: tasks.Prepared) -> str:
    """Key the Trainer compares for best-epoch selection (`eval_` is added by the Trainer)."""
    if isinstance(prepared.eval, dict) and not prepared.primary_metric.startswith(tuple(prepared.eval)):
        return f"{next(iter(prepared.eval))}_{prepared.primary_metric}"
    return prepared.primary_metric


def _training_args(spec: RunSpec, prepared: tasks.Prepared, run_dir: Path, seed: int):
    t = spec.trainer
    _, args_cls = _trainer_classes(prepared.head == "seq2seq")
    strategy = t["eval_every"]
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["eval_batch_size"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        adam_beta1=t["adam_beta1"],
        adam_beta2=t["adam_beta2"],
        adam_epsilon=t["adam_epsilon"],
        gradient_accumulation_steps=t["grad_accum"],
        max_grad_norm=t["max_grad_norm"],
        logging_strategy="steps",
        logging_steps=t["logging_steps"],
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=t.get("eval_steps"),
        save_steps=t.get("eval_steps"),
        save_total_limit=2,
        load_best_model_at_end=bool(t["select_best"]),
        metric_for_best_model=_best_metric_name(prepared),
        greater_is_better=prepared.greater_is_better,
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=not t["progress_bar"],
        dataloader_num_workers=t["num_workers"],
        bf16=t["precision"] == "bf16",
        fp16=t["precision"] == "fp16",
        torch_compile=bool(t["compile"]),
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=prepared.extra.get("remove_unused_columns", True),
    )
    if distributed.world_size() > 1:  # a torchrun launch: DDP through the Trainer
        kwargs["ddp_backend"] = distributed.backend(t)
        # Our losses are per-device means (classification heads ignore `num_items_in_batch`, and the
        # MoE aux loss is added inside the model's loss), so the Trainer's x world_size rescale for
        # token-averaging across devices would inflate them; DDP's gradient mean is the right one.
        kwargs["average_tokens_across_devices"] = False
    if t.get("deepspeed"):  # e.g. trainer=deepspeed_zero2 (the released runs: ZeRO-2, optimizer offload)
        kwargs["deepspeed"] = t["deepspeed"]
    if prepared.head == "seq2seq":
        kwargs.update(predict_with_generate=True, generation_max_length=prepared.generation.get("max_new_tokens"))
    return args_cls(**kwargs)


def _sample_limits(task_cfg: dict, trainer_cfg: dict) -> dict:
    """The smaller of the task's and the trainer's sample caps (null = no cap)."""
    out = dict(task_cfg)
    for key in ("max_train_samples", "max_eval_samples"):
        caps = [c for c in (task_cfg.get(key), trainer_cfg.get(key)) if c is not None]
        out[key] = min(caps) if caps else None
    return out


def pad_like_released(prepared: tasks.Prepared, spec: RunSpec) -> None:
    """With the released padding-inclusive sequence mean (merge.padding_mean=include) a sequence's
    routing scores depend on how much padding it carries; the released collator pads every batch to
    max_length, so do the same, or the scores would depend on the lengths of the batch-mates."""
    collator, length = prepared.collator, spec.task.get("max_length")
    if spec.options.padding_mean == "include" and length and hasattr(collator, "padding"):
        collator.padding, collator.max_length = "max_length", length


@dataclass
class Claim:
    """What this command will do to its run directory, decided before anything is changed."""

    resume_from: str | None = None  # the checkpoint to continue from
    clear: bool = False  # overwrite=true: remove the earlier run's files (once everything is validated)
    replaces: str | None = None  # the MLflow run id of the run being overwritten
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that cannot be loaded
    changed: list[str] = field(default_factory=list)  # resume_changed=true: what differs from the record


def changed_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting (flattened) that differs, RESUME_NEUTRAL keys aside."""
    old, new = tracking.flatten(recorded), tracking.flatten(current)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(RESUME_NEUTRAL))
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys]


def _plan_claim(run_dir: Path, cfg: dict[str, Any], params: dict[str, Any]) -> Claim:
    """Decide, reading only, whether this command may use `run_dir` and how; refuses to clobber
    an earlier run unless told to, and to resume one with another config unless told to."""
    ckpt_dir = run_dir / "checkpoints"
    last, damaged = verified_checkpoints(ckpt_dir)
    finished = (run_dir / "metrics.json").exists()
    id_file = run_dir / tracking.RUN_ID_FILE
    if cfg.get("resume"):
        if finished and not cfg.get("overwrite"):
            raise ConfigError(f"{run_dir} holds a finished run (metrics.json); pass overwrite=true to redo it")
        if damaged and last is None:
            why = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
            raise CheckpointError(f"no checkpoint in {ckpt_dir} can be resumed from ({why}); "
                                  "pass overwrite=true without resume=true to start the run over")  # fmt: skip
        record = run_dir / CONFIG_RECORD
        changed = changed_keys(json.loads(record.read_text()), params) if record.exists() else []
        if changed and not cfg.get("resume_changed"):
            raise ConfigError(
                f"resume=true with a config that differs from the one {run_dir} was started with: "
                f"{'; '.join(changed)}; pass resume_changed=true to continue with the new values anyway "
                "(logged), or overwrite=true without resume=true to start over"
            )
        return Claim(resume_from=str(last) if last else None, damaged=damaged, changed=changed)
    if last or damaged or finished or id_file.exists():
        if not cfg.get("overwrite"):
            raise ConfigError(
                f"{run_dir} already holds a run; pass resume=true to continue it or overwrite=true to replace it"
            )
        return Claim(clear=True, replaces=id_file.read_text().strip() if id_file.exists() else None)
    return Claim()


def _take(run_dir: Path, claim: Claim, params: dict[str, Any], hydra_pending: Path | None) -> None:
    """Carry out the claim, now that everything that could be validated was: the only place an
    earlier run's files are changed."""
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(ckpt_dir)  # half-written saves of a killed run: never loaded, so never kept
    if claim.clear:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for name in ("metrics.json", tracking.RUN_ID_FILE, CONFIG_RECORD):
            (run_dir / name).unlink(missing_ok=True)
    if claim.damaged:
        set_aside(claim.damaged)
        for path, problem in claim.damaged:
            print(f"warning: {path.name} is damaged ({problem}); moved to .damaged-{path.name}; resuming from "
                  f"{Path(claim.resume_from).name if claim.resume_from else 'the start'}", file=sys.stderr)  # fmt: skip
    if claim.changed:
        print(f"warning: resume_changed=true: resuming {run_dir} with {'; '.join(claim.changed)}", file=sys.stderr)
    if claim.changed or not (run_dir / CONFIG_RECORD).exists():
        atomic_write_text(run_dir / CONFIG_RECORD, json.dumps(params, indent=2, sort_keys=True, default=str))
    if hydra_pending is not None and hydra_pending.is_dir():
        _publish_hydra_record(hydra_pending)


def _publish_hydra_record(pending: Path) -> None:
    """Hydra's record of the command (`config.yaml`, `hydra.yaml`, `overrides.yaml`), written to
    `pending` before the run was validated, becomes `.hydra/` next to it — redacted."""
    import yaml

    for path in pending.glob("*.yaml"):
        tree = yaml.safe_load(path.read_text())
        clean = redact_secrets({"_": tree})["_"]
        path.write_text(yaml.safe_dump(clean, sort_keys=False))
    publish(pending, pending.with_name(".hydra"))


def _resource_metrics(model: torch.nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    """Parameter counts by layer type (deterministic: go into the final metrics) and the peak
    memory of this process (GPU allocator peak, else peak RSS; logged to MLflow only)."""
    import resource

    params = {f"final_params_{k}": float(v) for k, v in count_parameters(model).items()}
    if torch.cuda.is_available():
        return params, {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    return params, {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def _flops_per_token(trainer, model: torch.nn.Module) -> dict[str, float]:
    """Forward FLOPs per input token of one training-mode pass over the first eval batch, counted
    by torch's FlopCounterMode (matmuls: token linears, merging, curvature and routing alike).

    Measured after training and evaluation, so the random numbers it draws (dropout, router noise)
    change nothing the run reports; training mode so the curvature transform is counted, not
    served from the eval cache. Tokens are the input positions the model processes (padding
    included: it is computed too); for images, the patch tokens of the backbone's stem.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch = first_eval_batch(trainer)
    if "input_ids" in batch:
        tokens = batch["input_ids"].numel()
    else:  # timm backbones: patches per image x images
        stem = getattr(getattr(model, "model", model), "patch_embed", None)
        patches = getattr(stem, "num_patches", None)
        if patches is None:
            return {}
        tokens = patches * len(next(v for v in batch.values() if torch.is_tensor(v)))
    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**batch)
    finally:
        model.train(was_training)
    return {"final_flops_per_token": counter.get_total_flops() / tokens}


def _final_metrics(trainer, prepared: tasks.Prepared) -> dict[str, float]:
    """Eval metrics of the weights the run ends with: the selected (best) or the last step.

    That step's evaluation is already in the Trainer's log, and evaluation is deterministic, so it
    is reused; only when that step was never evaluated (e.g. eval_every=steps off the last step
    and select_best=false) is the evaluation run again.
    """
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end and state.best_global_step else None
    step = step or state.global_step
    results = {k: v for entry in state.log_history if entry.get("step") == step
               for k, v in entry.items() if k.startswith("eval_")}  # fmt: skip
    if f"eval_{_best_metric_name(prepared)}" not in results:
        results = trainer.evaluate()
    return {f"final_{k.removeprefix('eval_')}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


def _prompts(spec: compose_config.ComposeSpec) -> dict[str, list[str]] | None:
    """Each domain's router-init prompts: `domain:<name>` (camex.tasks.domains) or a text file."""
    if spec.router.init not in ("centroid", "cheap_embed"):
        return None
    from camex.tasks.domains import texts

    out = {}
    for domain, source in spec.prompts.items():
        if source.startswith("domain:"):
            out[domain] = texts(source.removeprefix("domain:"), spec.prompts_per_domain, seed=0)
        else:
            lines = [x for x in Path(source).read_text(encoding="utf-8").splitlines() if x.strip()]
            out[domain] = lines[: spec.prompts_per_domain]
    return out


def _compose(model: torch.nn.Module, spec: compose_config.ComposeSpec, run: RunSpec, tokenizer, seed: int) -> None:
    """The MoE composed from fine-tuned checkpoints (compose=...) instead of an upcycled copy."""
    compose.compose_into(
        model, spec.base, spec.experts, variant=run.variant, options=run.options, shared=spec.shared,
        router=spec.router, tokenizer=tokenizer, prompts=_prompts(spec), seed=seed,
    )  # fmt: skip
    if spec.save:
        compose.save(model, spec.save, tokenizer=tokenizer)
    if spec.train_only == "router":
        compose_config.train_only_router(model)
    if spec.routing is not None:  # heuristic routing from the dense sources themselves
        from transformers import AutoModelForCausalLM

        from camex.compose.attach import attach
        from camex.compose.sources import open_checkpoint

        load = [*spec.experts.values(), *([spec.base] if spec.routing.method == "task_vector" else [])]
        dense = [AutoModelForCausalLM.from_pretrained(str(open_checkpoint(r, "compose").path)) for r in load]
        base = dense.pop() if spec.routing.method == "task_vector" else None
        attach(model, spec.routing, dense, base)


def _compose_heterogeneous(spec: compose_config.ComposeSpec) -> torch.nn.Module:
    """compose.heterogeneous: experts of other depths/widths, each keeping its stack (MERGEME.md §2.3)."""
    from camex.compose.hetero import from_checkpoints

    model = from_checkpoints(spec.experts, top_k=spec.heterogeneous.top_k)
    if spec.train_only == "router":
        model.requires_grad_(False)
        model.router.requires_grad_(True)
    return model


def train(cfg: dict[str, Any], *, run_dir: Path, hydra_pending: Path | None = None) -> dict[str, Any]:
    """Run one training run from a resolved config (plain containers).

    Returns `{"metrics": {final_*: value}, "primary": key of the objective, "greater_is_better",
    "run_id"}`, also written to `<run_dir>/metrics.json`. `hydra_pending`: where Hydra wrote its
    record of the command; it becomes `.hydra/` once the run may start, and is dropped otherwise.
    """
    try:
        return _train(cfg, run_dir, hydra_pending)
    except BaseException:
        if hydra_pending is not None and hydra_pending.is_dir() and distributed.is_main():
            shutil.rmtree(hydra_pending, ignore_errors=True)  # a refused command leaves the old record alone
        raise


def _train(cfg: dict[str, Any], run_dir: Path, hydra_pending: Path | None) -> dict[str, Any]:
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    spec = validate(cfg)
    composing = compose_config.parse(  # a bad source stops here, before any data or weights are read
        cfg.get("compose"), default_base=models.resolve_source(spec.model.get("pretrained"), "model.pretrained")
    )
    # an unreachable tracking server fails here, in seconds, before any data or model is loaded
    spec.tracking = tracking.resolve_store(spec.tracking, output_root=cfg["paths"]["output_root"])
    problem = distributed.check_launch(spec.trainer)
    if problem:
        raise ConfigError(problem)
    distributed.init(spec.trainer)
    params = redact_secrets({k: v for k, v in cfg.items() if k not in CONTROL_KEYS and k != "hydra"})
    # Under torchrun only rank 0 decides about the run directory and probes the store; every rank
    # then gets its outcome, so all resume from the same checkpoint or all stop with the same error.
    # Nothing is changed on disk yet: that waits until data and model have loaded (`_take`).
    claim, refused = Claim(), None
    if distributed.is_main():
        try:
            claim = _plan_claim(run_dir, cfg, params)
            tracking.probe_store(spec.tracking, output_root=cfg["paths"]["output_root"])
        except (ConfigError, CheckpointError, tracking.StoreError) as e:
            refused = e
    claim, refused = distributed.share_from_main((claim, refused))
    if refused is not None:
        refused.every_rank = True  # run.py lets all ranks say it before any exits (see there)
        raise refused
    if spec.trainer.get("threads"):  # e.g. 1 per worker when a parallel launcher runs 2 trials on 2 cores
        torch.set_num_threads(spec.trainer["threads"])
    host_memory.reuse_freed_memory(spec.trainer["reuse_host_memory"])  # speed only: the same bits either way
    seed = cfg["seed"]
    set_seed(seed)

    tokenizer = models.load_tokenizer(spec.model)
    hetero = composing is not None and composing.heterogeneous is not None
    if hetero and len(tokenizer) > composing.vocab_size:
        raise ConfigError(f"model.tokenizer has {len(tokenizer)} tokens, more than the vocabulary of "
                          f"compose.experts ({composing.vocab_size}); allowed: the experts' own tokenizer")  # fmt: skip
    prepared = tasks.prepare(_sample_limits(spec.task, spec.trainer), tokenizer=tokenizer, model=spec.info, seed=seed)
    pad_like_released(prepared, spec)
    if hetero:  # the experts themselves make the MoE: no dense model to build or upcycle
        model = _compose_heterogeneous(composing)
    else:
        model = models.build_model(spec.model, head=prepared.head, num_labels=prepared.num_labels, tokenizer=tokenizer)
    target = model.model if isinstance(model, models.VisionClassifier) else model
    try:
        if not hetero:
            footprint.check(target, spec.variant, spec.options)  # e.g. merge.num_experts=10**6: refused
        if composing is None:
            upcycle(target, spec.variant, spec.options)
        elif not hetero:
            _compose(target, composing, spec, tokenizer, seed)
    except ValueError as e:  # options checked against the loaded model, e.g. merge.layers beyond its depth
        raise ConfigError(str(e)) from None
    if distributed.is_main():
        _take(run_dir, claim, params, hydra_pending)
    distributed.barrier()
    resume_from = claim.resume_from

    trainer_cls, _ = _trainer_classes(prepared.head == "seq2seq")
    trainer = trainer_cls(
        model=model,
        args=_training_args(spec, prepared, run_dir, seed),
        data_collator=prepared.collator,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        compute_metrics=prepared.compute_metrics,
        preprocess_logits_for_metrics=prepared.preprocess_logits,
    )
    trainer.aux_owner = target
    trainer.decay_curvature = spec.options.curvature_decay
    trainer.score_generations = bool(prepared.extra.get("score_generations"))

    tags = {
        "task": spec.task["name"],
        "model": spec.model["name"],
        "merge": spec.variant.name,
        "seed": str(seed),
        "experiment": str(cfg.get("experiment_name")),
    }
    run_name = f"{spec.task['name']}|{spec.model['name']}|{spec.variant.name}|seed{seed}"
    started = time.time()
    with faults.SignalGuard() as guard, tracking.start_run(
        spec.tracking,
        output_root=cfg["paths"]["output_root"],
        run_dir=run_dir,
        experiment=str(cfg.get("experiment_name")),
        run_name=run_name,
        params=params,
        tags=tags,
        replaces=claim.replaces,
    ) as tracker:
        if claim.changed and tracker.enabled:  # resume_changed=true: the change stays on the run's record
            tracker.log_text("\n".join(claim.changed) + "\n", f"resume_changed_step{_step_of(resume_from)}.txt")
        trainer.add_callback(_TrackerCallback(tracker))
        trainer.add_callback(curvature_callback(trainer, model, tracker))  # at every evaluation
        for callback in faults.injected_callbacks():  # fault injection for tests; none in normal use
            trainer.add_callback(callback)
        trainer.add_callback(faults.signal_callback(guard))  # SIGINT/SIGTERM: checkpoint, then stop
        tracker.log_dict(params, "config.json")
        with guard.deferred():
            if spec.trainer["max_steps"] != 0:  # 0: evaluate the model as built (e.g. MergeME's no fine-tuning)
                trainer.train(resume_from_checkpoint=resume_from)
        saved = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
        if guard.received is not None:
            raise faults.RunInterrupted(guard.received, trainer.state.global_step, saved)
        if tracker.lost is not None:  # the store failed mid-run: the loop checkpointed and stopped
            raise tracking.StoreLost(trainer.state.global_step, tracker.lost, saved)
        final = _final_metrics(trainer, prepared)
        trainer.save_model(str(run_dir / "final_model"))  # the selected (best) weights, safetensors
        cost = getattr(target, "camex_routing_cost", None)
        if cost is not None:  # heuristic routing's extra passes through the sources / base
            final.update({f"final_routing_{k}": float(v) for k, v in cost.as_dict().items() if k != "per_source"})
        # restorable by camex.load: not with heuristic routing (its gates were replaced by the sources'
        # weights, which camex.load cannot rebuild) nor heterogeneous experts (final_model/ holds them)
        routed = composing is not None and composing.routing is not None
        if composing is not None and not routed and not hetero and distributed.is_main():
            compose.save(target, run_dir / "final_composed", tokenizer=tokenizer)
        final["final_wall_seconds"] = time.time() - started
        params_count, peak_memory = _resource_metrics(model)
        peak_memory.update(_flops_per_token(trainer, model))  # MLflow only: depends on the eval batch's padding
        final.update(params_count)
        tracker.log_metrics({**final, **peak_memory}, step=trainer.state.global_step)
        payload = {
            "metrics": final,
            "primary": f"final_{_best_metric_name(prepared)}",
            "greater_is_better": prepared.greater_is_better,
            "run_id": tracker.run_id,
        }
        tracker.log_dict(payload, "metrics.json")
        if distributed.is_main():
            atomic_write_text(run_dir / "metrics.json", json.dumps(payload, indent=2))
            if not spec.trainer.get("keep_checkpoints", True):  # finished: nothing left to resume from
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if distributed.is_main():
        _announce(run_dir, spec, cfg, payload)
    return payload


def _announce(run_dir: Path, spec: RunSpec, cfg: dict, payload: dict[str, Any]) -> None:
    primary = payload["primary"]
    print(f"\nfinished: {spec.task['name']} | {spec.model['name']} | {spec.variant.name} | seed {cfg['seed']}")
    print(f"  {primary.removeprefix('final_')} = {payload['metrics'].get(primary)}")
    print(f"  results:  {run_dir.resolve() / 'metrics.json'}")
    if spec.tracking.get("enabled", True):
        uri = spec.tracking.get("uri") or tracking.default_uri(cfg["paths"]["output_root"])
        print(f"  MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    sys.stdout.flush()
