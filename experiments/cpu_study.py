"""``python -m experiments.cpu_study [--only NAME ...] [--parallel N]``: the phenomenon on a laptop, as evidence.

Runs the CPU study of ``configs/cpu_study/study.yaml`` — small GPT-NeoX models on real English (the offline corpus
through the study's 8k tokenizer) — then analyses each run where it ran and commits compact results:

* ``results/cpu_study/<run>/``: ``run.json`` (command, commit, CPU, versions, wall time, resolved config, summary),
  ``config.yaml``, ``{metrics,forces,weibull}.jsonl.xz``, ``analysis.json``, ``figures/*.png``;
* ``results/cpu_study/figures/``: λ, align share and RMS of every run against the fraction of training;
* ``docs/results.md``: regenerated (``make results``), with the CPU study's and the Muon study's
  sections built from those folders.

A run already in ``results/cpu_study/`` with the same resolved config is not run again (``--redo`` to force).
The token files are built first when missing (``python -m train.pretokenize configs/cpu_study/text.yaml``). Runs
go ``--parallel`` at a time (default 2, one thread each: on 2 cores two single-thread runs train faster in total
than one two-thread run after the other), and each run's wall time is recorded: it is the study's benchmark
figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiments.campaign import config_changes, config_digest
from experiments.compact_logs import compact_run, run_summary
from experiments.gpu_evidence.window import commit_info, detect_device
from train import provenance
from train.config import load_config
from train.rundir import plain_config

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "configs" / "cpu_study" / "study.yaml"
RESULTS = ROOT / "results" / "cpu_study"
TOKENS = ROOT / ".cache" / "cpu_study" / "tokens"
#: Spline-recovery spacings (the study's configs keep a snapshot every 50 steps).
SPACINGS = [50, 100, 250, 500]


@dataclass(frozen=True)
class StudyRun:
    name: str  # run name, also the results folder
    config: str  # path of its YAML, relative to the repository root
    seed: int
    group: str  # "adamw" or "muon": which section of docs/results.md shows it
    role: str  # what it is for: "rise", "ttau", "ttau_lr_squared", ...
    overrides: tuple[str, ...] = ()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "train", self.config, f"run.seed={self.seed}", f"run.name={self.name}",
                *self.overrides, "logging.progress=false", "logging.report=false"]  # fmt: skip


def load_study(path: Path = STUDY) -> list[StudyRun]:
    """Every (config, seed) of the study file, in its order."""
    tree = yaml.safe_load(path.read_text()) or {}
    runs = []
    for entry in tree.get("runs", []):
        for seed in entry.get("seeds", [1]):
            runs.append(
                StudyRun(
                    name=f"{entry['name']}_s{seed}",
                    config=entry["config"],
                    seed=int(seed),
                    group=entry.get("group", "adamw"),
                    role=entry["role"],
                    overrides=tuple(entry.get("overrides", [])),
                )
            )
    return runs


def resolved(run: StudyRun):
    return load_config(ROOT / run.config, [f"run.seed={run.seed}", f"run.name={run.name}", *run.overrides])


def is_done(run: StudyRun, results: Path | None = None) -> bool:
    record = (results or RESULTS) / run.name / "run.json"
    if not record.is_file():
        return False
    return json.loads(record.read_text()).get("config_digest") == config_digest(resolved(run))


def ensure_tokens() -> None:
    if (TOKENS / "train.bin").is_file() and (TOKENS / "valid.bin").is_file():
        return
    print(f"study: building the token files in {TOKENS.relative_to(ROOT)} (about 2 minutes)", flush=True)
    cmd = [sys.executable, "-m", "train.pretokenize", "configs/cpu_study/text.yaml", str(TOKENS)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def pack(
    run: StudyRun,
    run_dir: Path,
    wall_s: float,
    threads: int,
    results: Path | None = None,
    spacings: list[int] | None = None,
) -> Path:
    """The run's compact results folder (logs, analysis, figures, provenance)."""
    from instrumented_adamw.analysis.analyze import analyze_run
    from instrumented_adamw.analysis.plotting import compact_png
    from instrumented_adamw.analysis.report import make_report
    from instrumented_adamw.sinks import read_jsonl

    out = (results or RESULTS) / run.name
    tmp = out.with_name(out.name + ".tmp")
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    analysis = analyze_run(run_dir, work / "analysis", spacings=spacings or SPACINGS, cls="Transmission")
    report = make_report([run_dir], work / "report")
    # results/cpu_study/figures/align_share.png has every run's; each run keeps its own other figures, shrunk
    pngs = [p for p in (work / "report").glob("*.png") if p.name != "align_share.png"]
    pngs += list((work / "analysis").glob("spline_recovery.png"))
    sizes = compact_run(run_dir, tmp, work / "analysis" / "analysis.json", pngs, shrink_figure=compact_png)
    shutil.rmtree(work)
    cfg = resolved(run)
    metrics = read_jsonl(run_dir / "metrics.jsonl")  # the summary needs the metrics only, not the forces again
    summary = run_summary(metrics)
    summary.pop("transmission_align_share")
    record: dict[str, Any] = dict(
        kind="cpu_study", name=run.name, group=run.group, role=run.role, seed=run.seed, date=provenance.now_iso(),
        command="make study  (python -m experiments.cpu_study)",
        reproduce=" ".join(["python -m train", run.config, *run.command()[4:]]),
        commit=commit_info(ROOT), device=detect_device(force_dry=True), threads=threads, wall_s=round(wall_s, 1),
        config=plain_config(cfg), config_digest=config_digest(cfg), summary=summary,
        log_bytes=sizes, skipped=report.get("skipped", {}),
        spline=analysis.get("spline", {}),
    )  # fmt: skip
    (tmp / "run.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def adopt(runs: list[StudyRun], name: str, run_dir: str) -> int:
    """Pack a finished run directory as the study's run ``name``: a trial that turned out to be the study's config
    is not trained again. Its resolved config must match ``name``'s (model, data, optim, schedule, seed)."""
    run = next((r for r in runs if r.name == name), None)
    if run is None:
        print(f"study: unknown run {name!r}; known: {[r.name for r in runs]}", file=sys.stderr)
        return 2
    path = Path(run_dir)
    saved = yaml.safe_load((path / "config.yaml").read_text())
    changes = config_changes(saved, resolved(run))
    if changes:
        print(f"study: {path} is not {name}: " + "; ".join(changes), file=sys.stderr)
        return 2
    env = json.loads((path / "env.json").read_text())
    last = last_record_time(path)
    wall = last - (path / "env.json").stat().st_mtime
    out = pack(run, path, wall, int(env.get("threads", 0)) or 1)
    print(f"study: {path} packed as {out} ({wall / 60:.1f} min)")
    return 0


def last_record_time(run_dir: Path) -> float:
    """The wall-clock time of a run's last metrics record (read as the trainer's logs are: torn tail dropped)."""
    from instrumented_adamw.sinks import read_jsonl

    return float(read_jsonl(run_dir / "metrics.jsonl")[-1]["time"])


def run_all(todo: list[StudyRun], parallel: int, out_dir: str) -> list[str]:
    """Train ``todo``, ``parallel`` at a time with cores / ``parallel`` threads each, packing each run as it ends;
    returns the names of the runs that failed."""
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    todo = list(todo)
    running: list[tuple[StudyRun, subprocess.Popen, float, Path]] = []
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            run = todo.pop(0)
            cmd = [*run.command(), f"run.out_dir={out_dir}", "run.overwrite=true"]
            log_path = ROOT / out_dir / f"{run.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"study: {run.name} started ({threads} thread(s)); log {log_path.relative_to(ROOT)}", flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
            running.append((run, proc, time.perf_counter(), ROOT / out_dir / run.name))
        for entry in list(running):
            run, proc, t0, run_dir = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            wall = time.perf_counter() - t0
            if proc.returncode:
                failed.append(run.name)
                print(f"study: {run.name} FAILED (exit {proc.returncode}) after {wall / 60:.1f} min", flush=True)
                continue
            out = pack(run, run_dir, wall, threads)
            print(f"study: {run.name} done in {wall / 60:.1f} min -> {out.relative_to(ROOT)}", flush=True)
        time.sleep(1.0)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cpu_study", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run names (e.g. cpu_rise_s1); default: all")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (threads per run: cores / this)")
    parser.add_argument("--redo", action="store_true", help="run again even when results/cpu_study has the run")
    parser.add_argument("--out-dir", default="runs/cpu_study", help="where the runs train (not committed)")
    parser.add_argument("--list", action="store_true", help="list the study's runs and whether each is done")
    parser.add_argument(
        "--adopt",
        nargs=2,
        metavar=("NAME", "RUN_DIR"),
        help="pack a run trained elsewhere as the study's run NAME (its config must be NAME's)",
    )
    args = parser.parse_args(argv)
    runs = load_study()
    if args.adopt:
        return adopt(runs, *args.adopt)
    if args.only:
        unknown = set(args.only) - {r.name for r in runs}
        if unknown:
            print(f"study: unknown run(s) {sorted(unknown)}; known: {[r.name for r in runs]}", file=sys.stderr)
            return 2
        runs = [r for r in runs if r.name in args.only]
    if args.list:
        for r in runs:
            print(f"{r.name:28s} {r.group:6s} {r.role:18s} {'done' if is_done(r) else 'pending'}")
        return 0
    todo = [r for r in runs if args.redo or not is_done(r)]
    for r in runs:
        if r not in todo:
            print(f"study: {r.name} already in results/cpu_study with this config: skipped")
    if todo:
        ensure_tokens()
    failed = run_all(todo, args.parallel, args.out_dir)
    from experiments.results_doc.__main__ import main as regenerate_docs
    from experiments.results_doc.cpu_study_sections import study_figures

    for fig in study_figures(RESULTS):
        print(f"study: figure {fig.relative_to(ROOT)}")
    regenerate_docs([])
    print(f"study: finished; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
