"""``python -m experiments.results_doc [--check]``: docs/results.md and the GPU table of docs/benchmarks.md from the
committed results/ (``make results``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.results_doc.render import generate
from instrumented_adamw.utils.extras import MissingExtraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.results_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the committed results (default: results)")
    parser.add_argument("--docs", default="docs", help="where results.md and benchmarks.md are (default: docs)")
    parser.add_argument("--campaign", default="configs/campaign.yaml", help="the campaign, for what is pending")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the docs are not up to date")
    args = parser.parse_args(argv)
    campaign = args.campaign if Path(args.campaign).is_file() else None
    try:
        diffs = generate(args.results, args.docs, campaign, check=args.check)
    except (FileNotFoundError, ValueError, MissingExtraError) as exc:
        print(f"python -m experiments.results_doc: {exc}", file=sys.stderr)
        return 2
    if args.check and diffs:
        print("docs differ from what the committed results give; run `make results`:", file=sys.stderr)
        print("\n".join(diffs), file=sys.stderr)
        return 1
    verb = "differ" if args.check else "regenerated"
    print(f"{args.docs}/results.md and {args.docs}/benchmarks.md: {verb if diffs else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
