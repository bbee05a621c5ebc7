"""`python -m camex.report`: build the report from the runs in an MLflow store.

    python -m camex.report --tracking-uri sqlite:///outputs/mlflow.db --experiment glue_table --out reports/latest
"""

from __future__ import annotations

import argparse
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
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        uri = collect.normalise_uri(args.tracking_uri)
        tags = collect.parse_tag_filters(args.tag)
        reference = load_reference(args.reference)
        runs = collect.collect_runs(uri, args.experiment, tags)
    except (collect.CollectError, ReferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no finished camex runs at {uri} for experiments {args.experiment or 'all'} and tags {tags}",
              file=sys.stderr)  # fmt: skip
        return 2
    client = collect.client(uri)
    selection = [f"Tracking store: {uri}", f"Experiments: {', '.join(args.experiment) or 'all'}",
                 f"Tag filters: {', '.join(args.tag) or 'none'}"]  # fmt: skip
    out = Path(args.out)
    report = build_report(runs, reference, out, lambda rid, key: collect.metric_history(client, rid, key), selection)
    print(f"report: {len(runs)} runs, {len(report.tables)} tables, {len(report.figures)} figures, "
          f"{report.missing} missing cells")  # fmt: skip
    print(f"  {out.resolve() / 'report.html'}")
    print(f"  {out.resolve() / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
