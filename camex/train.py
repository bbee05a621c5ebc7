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
from pathlib import Path
from typing import Any

import torch

from camex import compose, distributed, faults, models, tasks, tracking
from camex.accounting import count_parameters
from camex.checkpoints import AtomicCheckpoints, atomic_write_text, remove_partial
from camex.compose import config as compose_config
from camex.config import ConfigError, RunSpec, validate
from camex.optim import parameter_groups
from camex.redact import redact_secrets
from camex.upcycle import upcycle

CONTROL_KEYS = ("resume", "overwrite")  # how to run, not what is run: never logged as params


class _CamexTrainerMixin:
    """Adds the MoE auxiliary loss to the logs and builds AdamW from `camex.optim` groups."""

    aux_owner: torch.nn.Module | None = None
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

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            groups = parameter_groups(model or self.model, args.weight_decay)
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


def _trainer_classes(seq2seq: bool):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

    base, args = (Seq2SeqTrainer, Seq2SeqTrainingArguments) if seq2seq else (Trainer, TrainingArguments)
    # atomic checkpoint folders, a NaN/inf loss stops the run, and (only when the environment asks)
    # a kill in the middle of a checkpoint save
    mixins = (_CamexTrainerMixin, faults.FiniteLossGuard, AtomicCheckpoints, faults.KillInSave)
    return type("CamexTrainer", (*mixins, base), {}), args


class _TrackerCallback:
    """Forwards every Trainer log line to MLflow at the current optimizer step."""

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

        return Callback()


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


def _claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from; refuses to clobber an earlier run unless told to."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = run_dir / "checkpoints"
    remove_partial(ckpt_dir)  # half-written saves of a killed run: never loaded, so never kept
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    finished = (run_dir / "metrics.json").exists()
    if resume:
        if finished and not overwrite:
            raise ConfigError(f"{run_dir} holds a finished run (metrics.json); pass overwrite=true to redo it")
        return last
    if last or finished or (run_dir / tracking.RUN_ID_FILE).exists():
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run; pass resume=true to continue it or overwrite=true to replace it"
            )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for name in ("metrics.json", tracking.RUN_ID_FILE):
            (run_dir / name).unlink(missing_ok=True)
    return None


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

    named = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else None  # e.g. MNLI's two splits
    batch = next(iter(trainer.get_eval_dataloader(next(iter(named)) if named else None)))
    device = trainer.args.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
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


def train(cfg: dict[str, Any], *, run_dir: Path) -> dict[str, Any]:
    """Run one training run from a resolved config (plain containers).

    Returns `{"metrics": {final_*: value}, "primary": key of the objective, "greater_is_better",
    "run_id"}`, also written to `<run_dir>/metrics.json`.
    """
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
    # Under torchrun only rank 0 claims (and may clear) the run directory; every rank then gets
    # its outcome, so all resume from the same checkpoint or all stop with the same error.
    claim: tuple[str | None, str | None] = (None, None)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            last = _claim_run_dir(run_dir, resume=bool(cfg.get("resume")), overwrite=bool(cfg.get("overwrite")))
            claim = (last, None)
        except ConfigError as e:
            claim = (None, str(e))
    resume_from, refused = distributed.share_from_main(claim)
    if refused:
        error = ConfigError(refused)
        error.every_rank = True  # run.py lets all ranks say it before any exits (see there)
        raise error
    if spec.trainer.get("threads"):  # e.g. 1 per worker when a parallel launcher runs 2 trials on 2 cores
        torch.set_num_threads(spec.trainer["threads"])
    seed = cfg["seed"]
    set_seed(seed)

    tokenizer = models.load_tokenizer(spec.model)
    prepared = tasks.prepare(_sample_limits(spec.task, spec.trainer), tokenizer=tokenizer, model=spec.info, seed=seed)
    model = models.build_model(spec.model, head=prepared.head, num_labels=prepared.num_labels, tokenizer=tokenizer)
    target = model.model if isinstance(model, models.VisionClassifier) else model
    try:
        if composing is None:
            upcycle(target, spec.variant, spec.options)
        else:
            _compose(target, composing, spec, tokenizer, seed)
    except ValueError as e:  # options checked against the loaded model, e.g. merge.layers beyond its depth
        raise ConfigError(str(e)) from None

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

    params = redact_secrets({k: v for k, v in cfg.items() if k not in CONTROL_KEYS and k != "hydra"})
    tags = {
        "task": spec.task["name"],
        "model": spec.model["name"],
        "merge": spec.variant.name,
        "seed": str(seed),
        "experiment": str(cfg.get("experiment_name")),
    }
    run_name = f"{spec.task['name']}|{spec.model['name']}|{spec.variant.name}|seed{seed}"
    started = time.time()
    with (
        faults.SignalGuard() as guard,
        tracking.start_run(
            spec.tracking,
            output_root=cfg["paths"]["output_root"],
            run_dir=run_dir,
            experiment=str(cfg.get("experiment_name")),
            run_name=run_name,
            params=params,
            tags=tags,
        ) as tracker,
    ):
        trainer.add_callback(_TrackerCallback(tracker))
        for callback in faults.injected_callbacks():  # fault injection for tests; none in normal use
            trainer.add_callback(callback)
        trainer.add_callback(faults.signal_callback(guard))  # SIGINT/SIGTERM: checkpoint, then stop
        tracker.log_dict(params, "config.json")
        with guard.deferred():
            trainer.train(resume_from_checkpoint=resume_from)
        if guard.received is not None:
            saved = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
            raise faults.RunInterrupted(guard.received, trainer.state.global_step, saved)
        final = _final_metrics(trainer, prepared)
        trainer.save_model(str(run_dir / "final_model"))  # the selected (best) weights, safetensors
        if composing is not None and distributed.is_main():  # restorable by camex.load
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
