"""``python -m experiments.gpu_evidence``: one prepared command that turns a window of GPU time into committed results.

    python -m experiments.gpu_evidence prepare                      # here, before a window: token files, commit record
    python -m experiments.gpu_evidence run --out DIR [--budget 540] [--parts checks,bench,runs]  # there (gpu-evidence)
    python -m experiments.gpu_evidence unpack DIR [--force]         # here, after: the fetched bundle into results/
    python -m experiments.gpu_evidence status                       # what results/ holds and what is pending

``run`` works through ``configs/campaign.yaml`` inside a wall-clock budget, checking the clock before every piece:
(a) the kernel checks (``tests/test_cuda.py`` with the Triton kernel compiled), (b) the benchmarks (one process,
each script's JSON), (c) the pending campaign runs, as many at once as measurement says pay off
(``experiments.scheduler``), each trained, analysed (``instrumented-adamw analyze``) and drawn (``report``) on the GPU
machine, its compact logs kept and its checkpoints deleted. Checks and benchmarks already in ``results/`` for
this device and the current hash of their sources are skipped, so a later window goes straight to pending runs.
Everything is packed into at most 8 files in ``--out`` (``experiments.bundle``) with a manifest of what ran, what was
skipped and why. On a machine without CUDA the same command is a *dry run*: the demo-size stand-ins of
``dry_run:`` in the campaign, in about a minute; it says so, and its bundle unpacks into ``results/dry_run/``.

The GPU machine is bare and has no network: nothing is installed, the package is not pip-installed (run from the
checkout with ``PYTHONPATH=.``), and optional packages (wandb, datasets) are never imported. The procedure:
docs/gpu_evidence.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import lzma
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments import bundle
from experiments.campaign import (
    CampaignError,
    committed_folder,
    load_campaign,
    piece_folder,
    run_states,
    source_hash,
)
from experiments.gpu_evidence.benchmarks import bench_worker, run_benchmarks
from experiments.gpu_evidence.campaign_runs import run_campaign, worker_run
from experiments.gpu_evidence.checks import run_checks
from experiments.gpu_evidence.window import (
    CARRY,
    PARTS,
    TOKENS,
    TRAVEL_LIMIT,
    ChildProcess,
    EvidenceLog,
    Window,
    commit_info,
    detect_device,
    ensure_tokens,
)
from experiments.scheduler import Budget
from train import provenance


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def command_run(args: argparse.Namespace) -> int:
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS)) + sorted(set(args.redo.split(",")) - set(PARTS) - {""})
    if bad:
        print(f"error: unknown part(s) {bad}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty: the bundle must be the only thing in it", file=sys.stderr)
        return 2
    win = _open_window(args, parts, out)
    only = [n for n in (args.runs or "").split(",") if n]
    for name in only:
        win.campaign.run(name)  # a misspelt name fails now, not after the checks
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill from outside still packs what is done
    try:
        win.checkpoint()
        if "checks" in parts:
            run_checks(win)
            win.checkpoint()
        if "bench" in parts:
            run_benchmarks(win)
            win.checkpoint()
        if "runs" in parts:
            if not win.dry:
                ensure_tokens(win.root, win.log)
            run_campaign(win, only, args.max_runs, args.max_concurrent)
    except KeyboardInterrupt:
        win.log("interrupted: stopping what runs, packing what is done")
        for proc in list(ChildProcess.live):
            proc.stop(grace=2.0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = win.checkpoint(complete=True)
    _print_summary(win, written, out)
    if not args.keep_work and not args.work:
        shutil.rmtree(win.work, ignore_errors=True)
        if not win.dry:
            with contextlib.suppress(OSError):
                win.work.parent.rmdir()  # .gpu/work, when empty
    return 1 if any(p["status"] in ("failed", "killed") for p in win.pieces) else 0


def _open_window(args: argparse.Namespace, parts: list[str], out: Path) -> Window:
    """The window this command is: device (or the dry run), budget, scratch directory and commit, logged."""
    log = EvidenceLog()
    root = Path(args.root)
    campaign = load_campaign(args.campaign, root)
    device = detect_device(force_dry=args.dry_run)
    dry = device["kind"] != "cuda"
    reserve = float(campaign.dry.get("pack_reserve_s", 3) if dry else campaign.pack_reserve_s)
    name = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{device['slug']}"
    if dry:
        log("DRY RUN: " + ("--dry-run given" if args.dry_run else "no CUDA device") + " — every piece runs its CPU "
            "stand-in (smoke benchmarks, demo-size runs). Nothing here is evidence; the bundle unpacks into "
            "results/dry_run/.")  # fmt: skip
    log(f"window {name}: {device['name']}, budget {args.budget:.0f} s ({reserve:.0f} s kept for packing), "
        f"parts {','.join(parts)}")  # fmt: skip
    # Scratch: on the GPU machine inside the checkout (a spline run's snapshots are 23 GB: the disk, not a tmpfs);
    # for a dry run a temporary directory.
    if args.work:
        work = Path(args.work)
    elif dry:
        work = Path(tempfile.mkdtemp(prefix="evidence-"))
    else:
        work = root / ".gpu" / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "bundle").mkdir(exist_ok=True)
    win = Window(root=root, results=Path(args.results) / ("dry_run" if dry else ""), campaign=campaign, device=device,
                 commit=commit_info(root), name=name, dry=dry, budget=Budget(args.budget, reserve_s=reserve), log=log,
                 work=work, staging=work / "bundle", redo={p for p in args.redo.split(",") if p},
                 argv=["python", "-m", "experiments.gpu_evidence", *sys.argv[1:]], out=out, parts=parts,
                 force_runs=args.force_runs)  # fmt: skip
    if win.commit.get("dirty"):
        log(f"note: the tree differs from commit {win.commit['sha']}: {win.commit['dirty'][:5]}")
    return win


def _print_summary(win: Window, manifest: dict, out: Path) -> None:
    print(f"\n{'part':<7} {'piece':<34} {'status':<12} reason")
    for p in win.pieces:
        print(f"{p['part']:<7} {p['name']:<34} {p['status']:<12} {p.get('reason', '')[:150]}")
    files = sorted(out.iterdir())
    total = sum(f.stat().st_size for f in files)
    print(f"\nbundle {out}: {len(files)} files, {total / bundle.MIB:.2f} MiB in {win.budget.elapsed():.0f} s "
          f"of a {win.budget.total_s:.0f} s budget" + (" (DRY RUN: not evidence)" if win.dry else ""))  # fmt: skip
    for d in manifest.get("dropped", []):
        print(f"dropped {d['what']} of {d['folder']}: {d['why']}")


# ---------------------------------------------------------------------------------------------- unpack, status, prepare
def command_unpack(args: argparse.Namespace) -> int:
    try:
        report = bundle.unpack([Path(p) for p in args.paths], Path(args.results), force=args.force)
    except (bundle.BundleError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "dry run (not evidence)" if report["dry_run"] else "evidence"
    print(f"window {report['window']} ({kind}) -> {report['target']}")
    if not report["complete"]:
        print("  note: the command did not finish (the window ended first); every folder here is complete, and the "
              "manifest lists the pieces it reached")  # fmt: skip
    for what in ("added", "replaced", "unchanged"):
        for folder in report[what]:
            print(f"  {what:<9} {folder}")
    for d in report["dropped"]:
        print(f"  dropped in the window: {d['what']} of {d['folder']} ({d['why']})")
    print("next: make results   (regenerates docs/results.md and docs/benchmarks.md), then commit "
          f"{args.results}/ and docs/")  # fmt: skip
    return 0


def command_status(args: argparse.Namespace) -> int:
    root = Path(args.root)
    campaign = load_campaign(args.campaign, root)
    for dry in (False, True):
        results = Path(args.results) / ("dry_run" if dry else "")
        print(f"\n{'dry run (results/dry_run)' if dry else 'campaign runs (results/runs)'}:")
        for s in run_states(campaign, results, dry):
            print(f"  {s.state:<8} {s.name:<34} {s.detail}")
        devices = sorted({p.name.rsplit("-", 1)[0] for p in results.glob("checks/*")})
        devices += sorted({p.name.rsplit("-", 1)[0] for p in results.glob("bench/*/*")} - set(devices))
        if not devices:
            print("  checks and benchmarks: none committed on any device yet")
        for d in devices:
            digest = source_hash(root, campaign.checks_sources)
            have = committed_folder(results, piece_folder("checks", d, digest)) is not None
            print(f"  checks on {d}: {'current' if have else 'older code only (rerun pending)'}")
            for spec in campaign.bench:
                have = committed_folder(results, piece_folder("bench", d, source_hash(root, spec.sources), spec.name))
                print(f"  bench {spec.name} on {d}: {'current' if have else 'pending'}")
    return 0


def command_prepare(args: argparse.Namespace) -> int:
    """Here, before a window: the token files compressed into .gpu/evidence/ with the commit they go with, and a
    check that the tree plus them fit what may travel (64 MiB)."""
    root = Path(args.root)
    tokens, carry = root / TOKENS, root / CARRY
    if not (tokens / "train.bin").is_file():
        from train.config import load_config
        from train.data import export_tokens

        print(f"pretokenizing {args.tokens_config} into {TOKENS} (about a minute and a half) ...", flush=True)
        cfg = load_config(args.tokens_config)
        export_tokens(cfg.data, cfg.run.seed, tokens)
    carry.mkdir(parents=True, exist_ok=True)
    meta = json.loads((tokens / "tokens.json").read_text())
    packed, packed_meta = carry / "train.bin.xz", carry / "tokens.json"
    current = packed.is_file() and packed_meta.is_file() and json.loads(packed_meta.read_text()) == meta
    if not current:
        print(f"compressing {TOKENS}/train.bin ({meta['train_tokens']:,} tokens) ...", flush=True)
        if shutil.which("xz"):
            with packed.open("wb") as fh:
                subprocess.run(["xz", "-6", "-T0", "-c", str(tokens / "train.bin")], stdout=fh, check=True)
        else:
            with (tokens / "train.bin").open("rb") as fin, lzma.open(packed, "wb", preset=6) as fout:
                shutil.copyfileobj(fin, fout, 16 * bundle.MIB)
        shutil.copy(tokens / "valid.bin", carry / "valid.bin")
        shutil.copy(tokens / "tokens.json", carry / "tokens.json")
    commit = commit_info(root)
    record = dict(sha=commit["sha"], dirty=commit["dirty"], date=provenance.now_iso())
    (carry / "commit.json").write_text(json.dumps(record,
                                                  indent=1))  # fmt: skip
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    tree = sum((root / f).stat().st_size for f in tracked.decode().split("\0") if f and (root / f).is_file())
    carried = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    total = tree + carried
    print(f"tracked tree {tree / bundle.MIB:.1f} MiB + {CARRY} {carried / bundle.MIB:.1f} MiB = "
          f"{total / bundle.MIB:.1f} MiB of the {TRAVEL_LIMIT / bundle.MIB:.0f} MiB that may travel")  # fmt: skip
    if commit["dirty"]:
        print(f"WARNING: uncommitted changes to tracked files {commit['dirty'][:8]}: the bundle will say commit "
              f"{commit['sha']} although the code differs. Commit, then prepare again.")  # fmt: skip
    if total > TRAVEL_LIMIT:
        print("error: too large to travel; see docs/gpu_evidence.md (results/ size)", file=sys.stderr)
        return 2
    print("\nthe device call (docs/gpu_evidence.md):")
    print(json.dumps(dict(command=DEVICE_COMMAND, carry=[str(CARRY)], timeout_s=600), indent=1))
    return 0


#: The prepared command for the device tool: it runs in the checkout's root there, with $OUT set.
DEVICE_COMMAND = 'PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m experiments.gpu_evidence run --out "$OUT" --budget 540'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_evidence", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the checkout (default: the current directory)")
    parser.add_argument("--campaign", default="configs/campaign.yaml")
    parser.add_argument("--results", default="results")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="checks, benchmarks and campaign runs inside a time budget; writes a bundle")
    run.add_argument("--out", required=True, help="an empty directory for the bundle ($OUT on the device machine)")
    run.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for everything (default 540)")
    run.add_argument("--parts", default="checks,bench,runs", help="comma-separated: checks,bench,runs")
    run.add_argument("--redo", default="", help="parts to rerun although results/ holds them (checks,bench,runs)")
    run.add_argument("--runs", default=None, help="only these campaign runs (comma-separated names)")
    run.add_argument("--max-runs", type=int, default=None, help="start at most N campaign runs")
    run.add_argument("--max-concurrent", type=int, default=None, help="cap on runs sharing the GPU")
    run.add_argument("--dry-run", action="store_true", help="the CPU stand-ins even where there is a GPU")
    run.add_argument("--force-runs", action="store_true", help="start runs although the kernel checks failed here")
    run.add_argument(
        "--work",
        default=None,
        help="scratch directory (default: .gpu/work/<window> on a GPU, a temporary one in a dry run; deleted after)",
    )
    run.add_argument("--keep-work", action="store_true", help="keep the temporary scratch directory")
    run.set_defaults(func=command_run)
    unp = sub.add_parser("unpack", help="verify a fetched bundle and write it into results/")
    unp.add_argument("paths", nargs="+", help="the folder the bundle's files were fetched into (or the files)")
    unp.add_argument("--force", action="store_true", help="replace result folders that differ from the bundle's")
    unp.set_defaults(func=command_unpack)
    st = sub.add_parser("status", help="campaign runs done / pending / stale, and checks and benchmarks per device")
    st.set_defaults(func=command_status)
    prep = sub.add_parser("prepare", help="token files and commit record for a window into .gpu/evidence/")
    prep.add_argument("--tokens-config", default="configs/local_corpus.yaml")
    prep.set_defaults(func=command_prepare)
    bw = sub.add_parser("bench-worker", help=argparse.SUPPRESS)
    bw.add_argument("spec")
    bw.set_defaults(func=lambda a: bench_worker(Path(a.spec)))
    wr = sub.add_parser("worker-run", help=argparse.SUPPRESS)
    wr.add_argument("spec")
    wr.set_defaults(func=lambda a: worker_run(Path(a.spec)))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CampaignError as exc:
        print(f"campaign error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
