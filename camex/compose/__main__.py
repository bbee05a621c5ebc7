"""Compose and save an MoE from the command line (exit status 2 with one line on bad input):

    python -m camex.compose --base BASE --expert news=DIR --expert code=DIR --out OUT \\
        [--shared ties] [--lam 0.3333] [--keep 0.8] [--disjoint sum] [--variant domain] [--router random]
"""

from __future__ import annotations

import argparse
import sys

from camex.exits import USER_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camex.compose", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--expert", action="append", required=True, metavar="DOMAIN=SOURCE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shared", default="mean")
    parser.add_argument("--lam", type=float, default=1.0 / 3.0)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--disjoint", default="sum")
    parser.add_argument("--variant", default="domain")
    parser.add_argument("--router", default="random", help="random | uniform | oracle (centroid: use the API)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from camex.compose import ComposeError, RouterInit, SharedMerge, compose, save

    try:
        experts = dict(e.split("=", 1) for e in args.expert)
        shared = SharedMerge(args.shared, lam=args.lam, keep=args.keep, disjoint=args.disjoint, seed=args.seed)
        model = compose(
            args.base, experts, shared=shared, router=RouterInit(args.router), variant=args.variant, seed=args.seed
        )
    except (ComposeError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return USER_ERROR
    save(model, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
