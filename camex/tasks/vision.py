"""Image classification for timm models: hub image data sets, local class folders, packaged digits.

Images are converted to RGB (grey digits included), then, as timm evaluates: eval resizes the
shorter side to floor(image_size / eval_crop_pct) and centre-crops image_size; train uses a
RandomResizedCrop (+ horizontal flip) when `train_augment` is set, else the eval transform.
Normalisation uses the model's mean / std unless the task config sets its own.

A local folder holds one sub-folder per class (ImageFolder layout); class ids follow the sorted
names of the train folder's sub-folders, and the eval folder's classes must be among them.

Prepared: rows decode on the fly (`set_transform`) to pixel_values float32 [3, S, S] and labels
int64; collator `collate_images`; compute_metrics takes class ids [N] (`preprocess_logits`
reduces logits to their argmax) or logits [N, C]. The Trainer must keep the columns
(remove_unused_columns=False), since the transform produces them on access.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from camex.tasks import columns, metrics
from camex.tasks.base import ModelInfo, Prepared
from camex.tasks.common import extra, load_subsampled, map_evals, unpack
from camex.tasks.errors import TaskError
from camex.tasks.sources import data_seed, subsample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def _class_dirs(root: Path, key: str) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise TaskError(f"{root} (task.{key}): no class sub-folders; expected {root}/<class name>/<image files>")
    return dirs


def read_folder(root: str, key: str, classes: list[str], verify: bool, cfg: dict) -> Any:
    """An ImageFolder-style directory as a Dataset(image, label) with labels from `classes`."""
    from datasets import Dataset, Features, Image, Value

    root_path = Path(root).expanduser()
    paths, labels = [], []
    for d in _class_dirs(root_path, key):
        if d.name not in classes:
            raise TaskError(f"{d} (task.{key}): class {d.name!r} is not a class of the train folder ({classes})")
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise TaskError(f"{d} (task.{key}): no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += [str(f) for f in files]
        labels += [classes.index(d.name)] * len(files)
    if verify:
        _verify(paths, key)
    feats = Features({cfg["image_field"]: Image(), cfg["label_field"]: Value("int64")})
    return Dataset.from_dict({cfg["image_field"]: paths, cfg["label_field"]: labels}, features=feats)


def _verify(paths: list[str], key: str) -> None:
    """Open each file's header (cheap) so a corrupt image stops the run before training."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise TaskError(f"{p} (task.{key}): not a readable image ({e})") from None


class ImageTransform:
    """Batch transform for datasets.set_transform: PIL images -> normalised tensors. Picklable for workers."""

    def __init__(self, cfg: dict, model: ModelInfo, train: bool):
        from torchvision import transforms as T

        size = model.image_size
        mean = cfg["image_mean"] if cfg["image_mean"] is not None else model.image_mean
        std = cfg["image_std"] if cfg["image_std"] is not None else model.image_std
        interp = T.InterpolationMode[cfg["interpolation"].upper()]
        aug = cfg["train_augment"]
        if train and aug is not None:
            kw = {"ratio": tuple(aug["ratio"])} if aug.get("ratio") is not None else {}
            ops = [T.RandomResizedCrop(size, scale=tuple(aug["scale"]), interpolation=interp, **kw)]
            if aug.get("hflip"):
                ops.append(T.RandomHorizontalFlip(aug["hflip"]))
        else:
            ops = [T.Resize(math.floor(size / cfg["eval_crop_pct"]), interpolation=interp), T.CenterCrop(size)]
        self.pipeline = T.Compose([*ops, T.ToTensor(), T.Normalize(list(mean), list(std))])
        self.image_field, self.label_field = cfg["image_field"], cfg["label_field"]
        self.num_labels = cfg["num_labels"]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        to_label = columns.class_label(self.num_labels)
        return {
            "pixel_values": [self.pipeline(im.convert("RGB")) for im in batch[self.image_field]],
            "labels": [to_label(y) for y in batch[self.label_field]],
        }


def collate_images(features: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long),
    }


def argmax_logits(logits: Any, labels: Any) -> Any:
    """preprocess_logits_for_metrics: keep class ids, not [B, C] logits (ImageNet: C = 1000)."""
    if isinstance(logits, tuple | list):
        logits = logits[0]
    return logits.argmax(-1)


def compute_top1(eval_pred: Any) -> dict[str, float]:
    preds, labels = unpack(eval_pred)
    if preds.ndim == 2:
        preds = preds.argmax(-1)
    return {"top1": metrics.accuracy(preds, labels)}


def _load(cfg: dict, seed: int) -> tuple[Any, Any]:
    spec = {cfg["image_field"]: lambda v: v, cfg["label_field"]: columns.class_label(cfg["num_labels"])}
    local = cfg["local"]
    if local["train"] is None:
        return load_subsampled(cfg, spec, seed)
    classes = [d.name for d in _class_dirs(Path(local["train"]).expanduser(), "local.train")]
    if len(classes) > cfg["num_labels"]:
        raise TaskError(f"{local['train']} (task.local.train): {len(classes)} classes, more than task.num_labels")

    def read(path: str, key: str) -> Any:
        return read_folder(path, key, classes, cfg["verify_images"], cfg)

    train = read(local["train"], "local.train")
    ev = local["eval"]
    evals = {k: read(p, f"local.eval.{k}") for k, p in ev.items()} if isinstance(ev, dict) else read(ev, "local.eval")
    s = data_seed(cfg, seed)
    return subsample(train, cfg["max_train_samples"], s), map_evals(
        lambda d: subsample(d, cfg["max_eval_samples"], s), evals
    )


def prepare(cfg: dict, *, tokenizer: Any, model: ModelInfo, seed: int) -> Prepared:
    train, evals = _load(cfg, seed)
    train.set_transform(ImageTransform(cfg, model, train=True))
    eval_tf = ImageTransform(cfg, model, train=False)
    map_evals(lambda d: d.set_transform(eval_tf), evals)
    return Prepared(
        train=train,
        eval=evals,
        collator=collate_images,
        head="image_classification",
        num_labels=cfg["num_labels"],
        compute_metrics=compute_top1,
        primary_metric=cfg["primary_metric"],
        greater_is_better=cfg["greater_is_better"],
        preprocess_logits=argmax_logits,
        extra=extra(
            cfg,
            train,
            evals,
            image_size=model.image_size,
            input_name="pixel_values",
            remove_unused_columns=False,  # the columns exist only through set_transform
        ),
    )
