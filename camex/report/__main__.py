"""`python -m camex.report`: build the report from the runs in an MLflow store.

    python -m camex.report --tracking-uri sqlite:///outputs/mlflow.db --experiment glue_table --out reports/latest
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from camex.report import collect
from camex.report.build import build_report
from camex.report.reference import ReferenceError, load_reference


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m camex.report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///outputs/mlflow.db"),
                   help="MLflow tracking URI (sqlite:///path.db, http://host:port) or a path to a .db file "
                        "(default: $MLFLOW_TRACKING_URI, else the project's outputs/mlflow.db)")
    p.add_argument("--experiment", action="append", default=[],
                   help="MLflow experiment name to include (repeatable; default: all experiments)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose tag KEY equals VALUE (repeatable), e.g. --tag model=t5_base")
    p.add_argument("--reference", default=None, help="published-values file (default: reports/paper_reference.yaml)")
    p.add_argument("--out", default="reports/latest", help="output folder (default: reports/latest)")
    p.add_argument("--provenance", default=None, type=Path,
                   help="JSON written by the command that produced the runs (command, wall_clock_s, git_commit, "
                        "machine, packages): shown at the top of the report")
    return p  # fmt: skip


def _provenance_lines(path: Path) -> list[str]:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--provenance {path}: not a readable JSON file ({exc})") from None
    if not isinstance(info, dict) or "command" not in info:
        raise ValueError(f"--provenance {path}: expected a JSON object with at least 'command'")
    lines = [f"Produced by: `{info['command']}`"]
    if "wall_clock_s" in info:
        n = len(info.get("invocations", [])) or 1
        stopped = info.get("parts_stopped", 0)
        note = f"; {stopped} part{'s' * (stopped > 1)} stopped before the end, not counted" if stopped else ""
        runs = f"{n} invocation{'s' * (n > 1)}{note}"
        lines.append(f"Wall-clock of the runs: {info['wall_clock_s'] / 60:.1f} min ({runs})")
    lines += [f"{label}: {info[key]}" for key, label in (("git_commit", "Git commit"), ("machine", "Machine"))
              if key in info]  # fmt: skip
    if isinstance(info.get("packages"), dict):
        lines.append("Packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        uri = collect.normalise_uri(args.tracking_uri)
        tags = collect.parse_tag_filters(args.tag)
        reference = load_reference(args.reference)
        runs = collect.collect_runs(uri, args.experiment, tags)
        provenance = _provenance_lines(args.provenance) if args.provenance else []
    except (collect.CollectError, ReferenceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no finished camex runs at {uri} for experiments {args.experiment or 'all'} and tags {tags}",
              file=sys.stderr)  # fmt: skip
        return 2
    client = collect.client(uri)
    selection = [f"Tracking store: {uri}", f"Experiments: {', '.join(args.experiment) or 'all'}",
                 f"Tag filters: {', '.join(args.tag) or 'none'}", *provenance]  # fmt: skip
    out = Path(args.out)
    report = build_report(runs, reference, out, lambda rid, key: collect.metric_history(client, rid, key), selection)
    print(f"report: {len(runs)} runs, {len(report.tables)} tables, {len(report.figures)} figures, "
          f"{report.missing} missing cells")  # fmt: skip
    print(f"  {out.resolve() / 'report.html'}")
    print(f"  {out.resolve() / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
