"""The ``instrumented-adamw`` command: ``fit`` (Weibull diagnostics), ``report`` (figures), ``analyze`` (closed loop,
spline recovery, depth)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instrumented_adamw.utils.extras import MissingExtraError

#: ``fit --method`` (instrumented_adamw.weibull.diagnostics.FIT_METHODS, named here so --help imports nothing heavy).
FIT_METHODS = ("exact", "histogram")


def _fit(args: argparse.Namespace) -> int:
    from instrumented_adamw.weibull import diagnostics as dx

    problem = _local_path_problem(args.path)
    if problem:
        print(f"instrumented-adamw fit: {problem}", file=sys.stderr)
        return 2
    try:
        weights = dx.load_weights(args.path, revision=args.revision)
        initial = dx.load_weights(args.init, revision=args.init_revision) if args.init else None
    except (dx.HubUnavailableError, FileNotFoundError, ValueError, MissingExtraError) as exc:
        print(f"instrumented-adamw fit: {exc}", file=sys.stderr)
        return 2
    blocks = dx.fit_blocks(weights, trim=args.trim, include_vectors=args.include_vectors, method=args.method)
    if not blocks:
        print(f"instrumented-adamw fit: no weight matrices to fit in {weights.source}", file=sys.stderr)
        return 2
    family = dx.family_of(weights)
    summary: dict = dict(
        source=weights.source, model_type=weights.model_type, family=family, trim=args.trim, method=args.method
    )
    if weights.config:
        try:
            summary["attention"] = dx.attention_architecture(weights.config)
        except ValueError:
            pass  # a config without head counts: nothing to report
    try:  # F6 against the half-normal anchor: needs only this checkpoint
        summary["k_minus_k0_transmission"] = dx.k_drift_from_anchor(blocks, args.trim).median
    except ValueError:
        summary["k_minus_k0_transmission"] = None  # no Transmission matrices (unclassified or unknown model)
    if initial is not None:  # F6 as the paper defines it: Δk = k_terminal − k_init
        init_blocks = dx.fit_blocks(initial, trim=args.trim, classes=[dx.TRANSMISSION], method=args.method)
        try:
            drift = dx.k_drift(init_blocks, blocks)  # Transmission blocks, matched by name
        except ValueError as exc:
            print(f"instrumented-adamw fit: --init {args.init}: {exc}", file=sys.stderr)
            return 2
        summary["init"] = initial.source
        summary["delta_k_transmission"] = drift.median
    if args.json:
        json.dump(dict(summary, blocks=[b.to_dict() for b in blocks]), sys.stdout, indent=1)
        print()
        return 0
    print(
        f"{weights.source}: {len(blocks)} blocks, model_type={weights.model_type}, naming={family}, trim={args.trim}, "
        f"{args.method} fit"
    )
    header = f"{'layer':>5} {'component':<10} {'class':<13} {'shape':<14} {'k':>7} {'lambda':>9} {'R2':>7} {'RMS':>9}"
    print(header + f" {'lam/RMS':>7}  name")
    for b in sorted(blocks, key=lambda b: (b.layer if b.layer is not None else -1, b.name)):
        f = b.fit
        layer = "-" if b.layer is None else str(b.layer)
        shape = "x".join(map(str, b.shape))
        print(
            f"{layer:>5} {b.component or '-':<10} {b.cls:<13} {shape:<14} {f.k:>7.4f} {f.lam:>9.5f} {f.r2:>7.4f} "
            f"{f.rms:>9.5f} {f.lam_over_rms:>7.4f}  {b.name}"
        )
    if summary["k_minus_k0_transmission"] is not None:
        print(f"median Transmission k − k0 (half-normal anchor): {summary['k_minus_k0_transmission']:+.4f}")
    if "delta_k_transmission" in summary:
        print(
            f"median Transmission Δk = k_terminal − k_init ({initial.source}): {summary['delta_k_transmission']:+.4f}"
        )
    if "attention" in summary:
        print(f"attention: {summary['attention']['kind']}")
    return 0


def _local_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be fitted, where it plainly means a local path: a run directory (its checkpoints are
    what fits), or a path whose first folder exists here but the rest does not (not a hub id)."""
    p = Path(path)
    checkpoints = sorted((p / "checkpoints").glob("step_*")) if p.is_dir() else []
    if checkpoints:
        return (f"{path} is a run directory; fit one of its checkpoints, e.g. {checkpoints[-1]} "
                f"({len(checkpoints)} in {p / 'checkpoints'})")  # fmt: skip
    if not p.exists() and (path.startswith((".", "/", "~")) or Path(p.parts[0]).is_dir()):
        return f"{path} does not exist"
    return None


def _report(args: argparse.Namespace) -> int:
    from instrumented_adamw.analysis.report import make_report

    missing = [r for r in args.runs if not Path(r).exists()]
    if missing:
        print(f"instrumented-adamw report: {', '.join(missing)} does not exist", file=sys.stderr)
        return 2
    out = args.out or str(Path(args.runs[0]) / "report")
    try:
        result = make_report(args.runs, out, cls=args.cls)
    except (FileNotFoundError, ValueError, MissingExtraError) as exc:
        print(f"instrumented-adamw report: {exc}", file=sys.stderr)
        return 2
    for f in result["files"]:
        print(f)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from instrumented_adamw.analysis.analyze import analyze_run

    if not Path(args.run).exists():
        print(f"instrumented-adamw analyze: {args.run} does not exist", file=sys.stderr)
        return 2
    try:
        result = analyze_run(args.run, args.out, args.spacings, cls=args.cls)
    except (FileNotFoundError, ValueError, MissingExtraError) as exc:
        print(f"instrumented-adamw analyze: {exc}", file=sys.stderr)
        return 2
    if args.json:
        summary = {k: v for k, v in result["closed_loop"].items()}
        print(json.dumps({"closed_loop": summary, "spline": result.get("spline"), "depth": result.get("depth")},
                         indent=1, default=float))  # fmt: skip
    else:
        print(analysis_summary(result))
    for f in result["files"]:
        print(f)
    return 0


def analysis_summary(result: dict) -> str:
    """The closed loop, spline recovery and depth of an analysis as a few aligned lines."""
    lines = [f"closed loop ({result.get('cls', 'Transmission')}): logRMSE of λ predicted from ‖W‖²(0) and the forces"]
    lines.append(f"  {'bridge':<16} {'exact':>9} {'published':>10} {'integration':>12} {'bridge only':>12}")
    loops = result["closed_loop"]
    for bridge in dict.fromkeys(k.split("/")[0] for k in loops):
        exact, pub = loops.get(f"{bridge}/exact", {}), loops.get(f"{bridge}/published", {})
        cells = [exact.get("log_rmse"), pub.get("log_rmse"), exact.get("integration_error"), exact.get("bridge_error")]
        lines.append(
            f"  {bridge:<16} " + " ".join(f"{_num(v):>{w}}" for v, w in zip(cells, (9, 10, 12, 12), strict=True))
        )
    spline = result.get("spline") or {}
    if "skipped" in spline:
        lines.append(f"spline recovery: not computed ({spline['skipped']})")
    else:
        lines.append("spline recovery: median recovered / true alignment [q1, q3], checkpoints S steps apart")
        for s, methods in spline.items():
            cells = "  ".join(f"{m} {_num(v.get('median'))} [{_num(v.get('q1'))}, {_num(v.get('q3'))}]"
                              for m, v in methods.items() if isinstance(v, dict))  # fmt: skip
            lines.append(f"  S = {s:>5}: {cells}")
    depth = result.get("depth") or {}
    if "deep_over_shallow" in depth:
        lines.append(f"depth: deepest / shallowest layer median λ at step {depth['step']}: "
                     f"{_num(depth['deep_over_shallow'])}")  # fmt: skip
    elif "skipped" in depth:
        lines.append(f"depth: not computed ({depth['skipped']})")
    lines.append("(--json for every number)")
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instrumented-adamw", description="Weight-norm force and Weibull tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="per-block Weibull(k, λ) fits of a checkpoint, safetensors file or HF model")
    fit.add_argument("path", help="a .safetensors/.pt/.bin file, an HF model directory, or a hub id (org/name)")
    fit.add_argument("--trim", type=float, default=0.1, help="fraction trimmed at each end (0.1 = mid-80)")
    fit.add_argument("--revision", default=None, help="hub revision (e.g. step1000) for a hub id")
    fit.add_argument("--include-vectors", action="store_true", help="also fit biases and norm weights")
    fit.add_argument(
        "--method",
        choices=FIT_METHODS,
        default="exact",
        help="exact (every element; default) or histogram (the papers' database pipeline: centred, 1024 log10 bins)",
    )
    fit.add_argument(
        "--init", default=None, help="initial checkpoint of the same model: also report Δk = k_terminal − k_init"
    )
    fit.add_argument("--init-revision", default=None, help="hub revision of --init (e.g. step0)")
    fit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fit.set_defaults(func=_fit)
    rep = sub.add_parser("report", help="figures (PNG) and one HTML page from run directories")
    rep.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl, forces.jsonl, ...)")
    rep.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report of the first run)")
    rep.add_argument("--cls", default="Transmission", help="parameter class to plot (default: Transmission)")
    rep.set_defaults(func=_report)
    ana = sub.add_parser("analyze", help="closed loop, spline recovery, depth and RMS budgets of a run directory")
    ana.add_argument("run", help="a run directory with step-0 Weibull fits and per-tensor force records")
    ana.add_argument("--out", default=None, help="output directory (default: RUN_DIR/analysis)")
    ana.add_argument("--spacings", type=int, nargs="*", default=None, help="checkpoint spacings (default 250 500 1000)")
    ana.add_argument("--cls", default="Transmission")
    ana.add_argument("--json", action="store_true", help="print the closed loop, spline and depth results as JSON")
    ana.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
