"""Part (c) of a window: the pending campaign runs, as many at once as measurement says pay off (the scheduler),
each trained, analysed and drawn by a worker process on the GPU machine, only its compact logs kept."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from experiments import bundle
from experiments.campaign import (
    committed_folder,
    config_digest,
    piece_folder,
    reproduce_command,
    resolve,
    run_overrides,
    run_states,
    source_hash,
)
from experiments.compact_logs import compact_run, run_summary
from experiments.gpu_evidence.window import ChildProcess, Window
from experiments.scheduler import (
    Observation,
    PendingRun,
    RunOutcome,
    RunProfile,
    Scheduler,
    TimingModel,
    snapshot_count,
)
from train import provenance
from train.rundir import plain_config


def timing_model(win: Window) -> TimingModel:
    """The campaign's priors, then what the benchmarks and earlier windows measured on this device."""
    model = TimingModel(win.campaign.run_priors(win.dry))
    name = win.device["name"]
    for result in sorted(win.results.glob(f"bench/train_step/{win.device['slug']}-*/result.json")):
        with contextlib.suppress(ValueError, KeyError, StopIteration):
            rows = json.loads(result.read_text())["rows"]
            ms = next(r["ms_per_step"] for r in rows if r["variant"].startswith("InstrumentedAdamW"))
            model.learn_step_ms("gpt_neox", ms * 1.05, "bench")  # + logging, fits and evals (5%, until measured)
    # Earlier windows on this device, oldest first (the latest measurement of a kind wins): every run they started,
    # finished or stopped, and the slowdowns they measured.
    windows = []
    for f in win.results.glob("windows/*.json"):
        with contextlib.suppress(ValueError):
            w = json.loads(f.read_text())
            if w.get("device", {}).get("name") == name:
                windows.append(w)
    slowdowns: dict[int, list[float]] = {}
    for w in sorted(windows, key=lambda w: w["window"]):
        for p in w.get("pieces", []):
            t = p.get("timing") or {}
            if p["part"] != "runs" or not t:
                continue
            if "startup_s" in t:
                model.learn_startup(t["startup_s"], "history")
            if "post_s" in t and p["status"] == "done":
                model.learn_post(t["post_s"], bool(p.get("spline")), "history")
            if t.get("step_ms") and t.get("step_ms_k") == 1 and not p.get("spline") and p.get("arch"):
                model.learn_step_ms(p["arch"], t["step_ms"], "history")
        for m in w.get("calibration", {}).get("measurements", []):
            if m["k"] > 1:
                slowdowns.setdefault(m["k"], []).append(m["slowdown"])
    for k, values in slowdowns.items():
        model.learn_slowdown(k, sorted(values)[len(values) // 2], "history")
    return model


def _metrics_step(path: Path) -> int:
    """The step of the last complete record of a metrics.jsonl (read from its end only)."""
    if not path.is_file():
        return 0
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        lines = fh.read().split(b"\n")
    for line in reversed(lines[:-1] if lines and lines[-1] else lines):
        with contextlib.suppress(ValueError, KeyError):
            return int(json.loads(line)["step"])
    return 0


class RunLauncher:
    """Starts ``worker-run`` processes and reports their phase (the worker's status file) and step (metrics)."""

    def __init__(self, win: Window, specs: dict[str, dict[str, Any]]) -> None:
        self.win, self.specs, self.procs = win, specs, {}

    def start(self, name: str) -> ChildProcess:
        spec_file = self.win.work / "specs" / f"{name}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(self.specs[name], indent=1))
        proc = ChildProcess([sys.executable, "-m", "experiments.gpu_evidence", "worker-run", str(spec_file)],
                    self.win.work / "logs" / f"{name}.log", self.win.child_env(), self.win.root)  # fmt: skip
        self.procs[name] = proc
        return proc

    def observe(self, name: str) -> Observation:
        spec = self.specs[name]
        phase = "starting"
        with contextlib.suppress(OSError, ValueError):
            phase = json.loads(Path(spec["status_file"]).read_text())["phase"]
        step = _metrics_step(Path(spec["run_dir"]) / "metrics.jsonl")
        if phase == "starting" and step > 0:
            phase = "training"
        return Observation(phase if phase in ("starting", "training", "post", "done") else "post", step)


def _free_gpu_gib() -> float | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
        return float(out.splitlines()[0]) / 1024
    return None


def _failed_checks(win: Window) -> str | None:
    """Where the kernel checks of this device and kernel source failed, in this window or as committed."""
    for p in win.pieces:
        if p["part"] == "checks" and p["status"] == "failed":
            return f"this window: {p['reason']}"
    folder = piece_folder("checks", win.device["slug"], source_hash(win.root, win.campaign.checks_sources))
    committed = committed_folder(win.results, folder)
    if committed is not None and json.loads((committed / "provenance.json").read_text())["status"] == "failed":
        return f"results/{folder}"
    return None


def run_campaign(win: Window, only: list[str], max_runs: int | None, max_concurrent: int | None) -> dict[str, Any]:
    chosen = _runs_to_start(win, only)
    if not chosen:
        return {}
    model = timing_model(win)
    win.log(f"[runs] run-time model: {json.dumps(model.summary())}")
    pending, specs = _worker_specs(win, chosen)
    launcher = RunLauncher(win, specs)
    profiles = {i.name: i.profile for i in pending}
    c = win.campaign
    fast = win.dry  # demo-size runs: measure over seconds, not tens of seconds
    concurrent = max_concurrent or int(c.dry.get("max_concurrent", 1) if win.dry else c.max_concurrent)
    scheduler = Scheduler(
        pending, win.budget, model, launcher, max_concurrent=concurrent, measure_s=3.0 if fast else 20.0,
        warmup_s=1.0 if fast else 5.0, poll_s=0.5 if fast else 2.0, max_starts=max_runs,
        free_gpu_gib=_free_gpu_gib if win.device["kind"] == "cuda" else (lambda: None),
        free_disk_gib=lambda: shutil.disk_usage(win.work).free / 2**30, log=win.log,
        on_finish=lambda o: _settle(win, o, profiles, launcher, scheduler, model),
    )  # fmt: skip
    win.calibration = dict(measurements=scheduler.measurements, model=model.summary())
    try:
        outcomes = scheduler.run()
    finally:  # whatever happens here, no run outlives the command (they run in their own sessions)
        for job in list(scheduler.running):
            job.handle.stop()
            outcome = RunOutcome(job.item.name, "stopped", "the command was interrupted", {})
            _settle(win, outcome, profiles, launcher, scheduler, model)
    for o in outcomes:
        if o.status == "not started":
            win.piece("runs", o.name, "not started", o.reason, arch=profiles[o.name].arch)
    win.calibration = dict(measurements=scheduler.measurements, model=model.summary())
    return win.calibration


def _runs_to_start(win: Window, only: list[str]) -> list:
    """The campaign runs (``only`` these, if given) not yet in results/ for the current config, unless the kernel
    checks failed on this device; each skipped one is recorded with its reason."""
    c = win.campaign
    states = {s.name: s for s in run_states(c, win.results, win.dry)}
    chosen = []
    for name in only or [r.name for r in c.runs]:
        state = states[c.run(name).name]
        if state.state == "done" and "runs" not in win.redo:
            win.piece("runs", name, "skipped", f"already in results/ ({state.detail})")
        else:
            if state.state == "stale":
                win.log(f"[runs] {name}: {state.detail}; it runs again")
            chosen.append(c.run(name))
    broken = _failed_checks(win) if chosen else None
    if broken and not win.force_runs:
        for run in chosen:
            win.piece("runs", run.name, "not started", f"the kernel checks failed on this device ({broken}): the runs "
                      "use that kernel; fix it first (or --force-runs)")  # fmt: skip
        return []
    return chosen


def _worker_specs(win: Window, chosen: list) -> tuple[list[PendingRun], dict[str, dict[str, Any]]]:
    """For the scheduler, each run's profile (arch, steps, snapshots); for its worker, what to train and where."""
    c = win.campaign
    pending, specs = [], {}
    work_runs = win.work / "runs"
    for run in chosen:
        extra = (f"run.out_dir={work_runs}", f"data.cache_dir={win.work / 'cache'}", "run.overwrite=true")
        cfg = resolve(c, run, win.dry, extra)
        steps = cfg.schedule.total_steps
        profile = RunProfile(cfg.model.arch, steps, snapshot_count(steps, cfg.checkpoint.every, cfg.checkpoint.early),
                             min(cfg.checkpoint.every, steps), run.spline)  # fmt: skip
        pending.append(PendingRun(run.name, profile))
        specs[run.name] = dict(
            name=run.name, config=run.config, overrides=run_overrides(c, run, win.dry, extra),
            run_dir=str(work_runs / run.name),
            staging=str(win.staging / "runs" / run.name), status_file=str(win.work / "status" / f"{run.name}.json"),
            spacings=list(c.spacings(win.dry)) if run.spline else None, group=run.group, why=run.why,
            spline=run.spline, reproduce=reproduce_command(c, run, win.dry), window=win.name, dry_run=win.dry,
            commit=win.commit, device=win.device, evidence_command=win.argv,
        )  # fmt: skip
    return pending, specs


def _settle(win: Window, o: RunOutcome, profiles, launcher: RunLauncher, scheduler: Scheduler, model) -> None:
    """A run's outcome into the bundle: a complete run's folder (with the scheduler's timing), else the reason and
    the end of its output; the bundle in --out is rewritten at once, so a window cut short keeps it."""
    kind = dict(arch=profiles[o.name].arch, spline=profiles[o.name].spline)  # what later windows learn from
    folder = win.staging / "runs" / o.name
    record_file = folder / "run.json"
    shutil.rmtree(win.work / "runs" / o.name, ignore_errors=True)  # checkpoints never leave the machine
    if o.status == "done" and record_file.is_file():
        record = json.loads(record_file.read_text())
        record["timing"]["scheduler"] = o.timing
        record_file.write_bytes(bundle.json_bytes(record))
        win.order.append(f"runs/{o.name}")
        win.piece("runs", o.name, "done", f"{o.timing.get('wall_s', 0):.0f} s", timing=o.timing, **kind,
                  folder=f"runs/{o.name}", errors=record.get("errors"))  # fmt: skip
    else:
        if folder.exists():
            shutil.rmtree(folder)  # only complete runs are results
        log = win.work / "logs" / f"{o.name}.log"
        tail = bundle.read_text_tail(log, 4000) if o.name in launcher.procs else ""
        status = "failed" if o.status == "done" else o.status
        reason = o.reason or ("the worker wrote no run.json" if o.status == "done" else "")
        win.piece("runs", o.name, status, reason, timing=o.timing, output_tail=tail, **kind)
    win.calibration = dict(measurements=scheduler.measurements, model=model.summary())
    win.checkpoint()


def _status(path: Path, phase: str, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(phase=phase, time=time.time(), **extra)))
    os.replace(tmp, path)


def worker_run(spec_file: Path) -> int:
    """One campaign run on this machine: train, analyse, draw, keep the compact logs, delete the checkpoints.

    Training must succeed for the run to count. The analysis and the figures may fail without losing it: the
    error goes into run.json (``errors``) and the logs are kept, since the closed loop and the figures can be
    redone from them anywhere (spline recovery cannot: it needs the checkpoints, deleted here).
    """
    spec = json.loads(spec_file.read_text())
    status_file = Path(spec["status_file"])
    _status(status_file, "starting")
    timing: dict[str, float] = {}
    errors: dict[str, str] = {}
    try:
        from instrumented_adamw.analysis.analyze import analyze_run
        from instrumented_adamw.analysis.report import make_report
        from train.config import load_config
        from train.loop import train

        t0 = time.monotonic()
        cfg = load_config(spec["config"], spec["overrides"])
        run_dir = train(cfg)
        timing["train_s"] = time.monotonic() - t0  # start-up included
        _status(status_file, "post")
        done: dict[str, dict[str, Any]] = {}
        for what, call in (("analysis", lambda: analyze_run(run_dir, run_dir / "analysis", spec["spacings"])),
                           ("report", lambda: make_report([run_dir], run_dir / "report"))):  # fmt: skip
            t1 = time.monotonic()
            try:
                done[what] = call()
            except Exception:
                errors[what] = traceback.format_exc()[-4000:]
                traceback.print_exc()
                done[what] = {}
            timing[f"{what}_s"] = time.monotonic() - t1
        t1 = time.monotonic()
        record = _compact_run(spec, cfg, run_dir, done["analysis"], done["report"])
        timing["compact_s"] = time.monotonic() - t1
        record.update(timing=dict(worker=timing), errors=errors or None)
        (Path(spec["staging"]) / "run.json").write_bytes(bundle.json_bytes(record))
    except Exception:
        _status(status_file, "failed", error=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return 1
    finally:  # checkpoints never leave the machine, and disk is what limits concurrent spline runs
        for sub in ("checkpoints", "resume"):
            shutil.rmtree(Path(spec["run_dir"]) / sub, ignore_errors=True)
    _status(status_file, "done")
    return 0


def _compact_run(spec: dict, cfg, run_dir: Path, analysis: dict, report: dict) -> dict[str, Any]:
    """The run's result folder: resolved config, compact logs, analysis, figures; returns run.json's content."""
    from instrumented_adamw.analysis.runs import load_run

    out = Path(spec["staging"])
    # Figures come back for a look; results/ does not commit them (instrumented-adamw report redraws them from the
    # logs). The analysis's closed-loop figure is the report's closed_loop_<run>.png again.
    pngs = [*(run_dir / "report").glob("*.png"), *(run_dir / "analysis").glob("spline_recovery.png")]
    # a 20k-step run's RMS budgets (every interval of two classes) make its analysis worth compressing
    sizes = compact_run(run_dir, out, run_dir / "analysis" / "analysis.json", pngs, compress_analysis_over=64 * 1024)
    shutil.copy(run_dir / "env.json", out / "env.json")
    return dict(kind="run", name=spec["name"], status="done", group=spec["group"], why=spec["why"],
                spline=spec["spline"], window=spec["window"], date=provenance.now_iso(), dry_run=spec["dry_run"],
                commit=spec["commit"], device=spec["device"], command=spec["evidence_command"],
                reproduce=spec["reproduce"], env=json.loads((run_dir / "env.json").read_text()),
                config=plain_config(cfg), config_digest=config_digest(cfg),
                summary=run_summary(load_run(run_dir).metrics),
                log_bytes=sizes, skipped={k: v for k, v in report.get("skipped", {}).items()},
                spline_status=analysis.get("spline", {}).get("skipped", "done") if analysis else "failed")  # fmt: skip
