"""Build the corpus-fitted tokenizers in camex/assets/ (camex.tasks.corpus_tokenizer).

    python scripts/build_tokenizer.py            # (re)write camex/assets/wiki_bpe8k/
    python scripts/build_tokenizer.py --out DIR  # write elsewhere (tests compare with the committed files)

wiki_bpe8k: byte-level BPE, 8,192 entries, fitted to the train split of task=offline/wiki_lm (the
gensim Wikipedia sample, split by article 90/10 with data seed 0, as the task splits it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ASSETS = {"wiki_bpe8k": ("offline/wiki_lm", 8192)}  # name -> (task preset whose train split it is fitted to, size)


def build(name: str, out: Path) -> Path:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from camex.tasks.corpus_tokenizer import train_bpe, train_split_texts

    task, size = ASSETS[name]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}"])
    texts = train_split_texts(OmegaConf.to_container(cfg.task, resolve=True))
    out.mkdir(parents=True, exist_ok=True)
    train_bpe(texts, size).save_pretrained(str(out))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="wiki_bpe8k", choices=sorted(ASSETS))
    p.add_argument("--out", type=Path, default=None, help="default: camex/assets/<name>")
    args = p.parse_args()
    print(build(args.name, args.out or ROOT / "camex" / "assets" / args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
