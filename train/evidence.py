"""``python -m train.evidence``: one prepared command that turns a window of GPU time into committed results.

    python -m train.evidence prepare                      # here, before a window: token files, commit record
    python -m train.evidence run --out DIR [--budget 540] [--parts checks,bench,runs]     # there (make gpu-evidence)
    python -m train.evidence unpack DIR [--force]         # here, after: the fetched bundle into results/
    python -m train.evidence status                       # what results/ holds and what is pending

``run`` works through ``configs/campaign.yaml`` inside a wall-clock budget, checking the clock before every piece:
(a) the kernel checks (``tests/test_cuda.py`` with the Triton kernel compiled), (b) the benchmarks (one process,
each script's JSON), (c) the pending campaign runs, as many at once as measurement says pay off
(``train.budget``), each trained, analysed (``instrumented-adamw analyze``) and drawn (``report``) on the GPU
machine, its compact logs kept and its checkpoints deleted. Checks and benchmarks already in ``results/`` for
this device and the current hash of their sources are skipped, so a later window goes straight to pending runs.
Everything is packed into at most 8 files in ``--out`` (``train.bundle``) with a manifest of what ran, what was
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
import importlib.metadata
import json
import lzma
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bundle
from .budget import Budget, Item, Observation, Outcome, RunProfile, Scheduler, TimingModel, snapshot_count
from .campaign import (
    Campaign,
    CampaignError,
    committed_folder,
    config_digest,
    load_campaign,
    piece_folder,
    reproduce_command,
    resolve,
    run_overrides,
    run_states,
    slug,
    source_hash,
)

PARTS = ("checks", "bench", "runs")
#: Where ``prepare`` puts what a window carries (``carry=[".gpu/evidence"]``), and where the runs read tokens.
CARRY = Path(".gpu/evidence")
TOKENS = Path(".gpu/tokens")
#: What may travel to the device machine in all: the working tree plus carried paths.
TRAVEL_LIMIT = 64 * bundle.MIB
#: Seconds to start the benchmark process (interpreter, torch) before its first script: counted before launching it.
WORKER_START_S = 5.0


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- context
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def detect_device(force_dry: bool = False) -> dict[str, Any]:
    """The GPU this command will use (or the CPU), with the versions a result depends on."""
    import torch

    cuda = torch.cuda.is_available() and not force_dry
    info: dict[str, Any] = dict(kind="cuda" if cuda else "cpu", cpu=_cpu_name(), cpu_count=os.cpu_count())
    if cuda:
        info["name"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
            driver, memory = (s.strip() for s in out.splitlines()[0].split(","))
            info.update(driver=driver, memory=memory)
    else:
        info["name"] = info["cpu"]
    info["slug"] = slug(info["name"] if cuda else f"cpu-{info['cpu']}")
    info["versions"] = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                            triton=_version("triton"), transformers=_version("transformers"), numpy=_version("numpy"),
                            platform=platform.platform())  # fmt: skip
    return info


def commit_info(root: Path) -> dict[str, Any]:
    """The commit the tree is at: from git where there is a repository, else from ``prepare``'s record (the
    device machine gets the working tree without .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")  # fmt: skip
        return dict(sha=sha, dirty=sorted(line[3:] for line in dirty if line.strip()), source="git")
    except (OSError, subprocess.SubprocessError):
        pass
    record = root / CARRY / "commit.json"
    if record.is_file():
        return dict(json.loads(record.read_text()), source=f"{CARRY}/commit.json (written by prepare)")
    return dict(sha=None, dirty=[], source="unknown: no git repository and no .gpu/evidence/commit.json")


class Log:
    """Prints, and keeps every line for ``evidence.log`` in the bundle."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class Ctx:
    root: Path
    results: Path  # results/ (real) or results/dry_run/ (dry run): where committed pieces are looked up
    campaign: Campaign
    device: dict[str, Any]
    commit: dict[str, Any]
    window: str
    dry: bool
    budget: Budget
    log: Log
    work: Path
    staging: Path
    redo: set[str]
    argv: list[str]
    out: Path | None = None
    parts: list[str] = field(default_factory=list)
    pieces: list[dict[str, Any]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # bundle priority of result folders
    calibration: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=_now_iso)
    force_runs: bool = False

    def manifest(self, complete: bool) -> dict[str, Any]:
        return dict(
            format=1,
            kind="instrumented-adamw evidence bundle",
            window=self.window,
            dry_run=self.dry,
            complete=complete,  # False: written while the window went on (it ended before the last rewrite)
            command=self.argv,
            commit=self.commit,
            device=self.device,
            budget_s=self.budget.total_s,
            parts=self.parts,
            redo=sorted(self.redo),
            started=self.started,
            wall_s=round(self.budget.elapsed(), 1),
            pieces=self.pieces,
            calibration=self.calibration,
        )

    def checkpoint(self, complete: bool = False) -> dict[str, Any]:
        """(Re)write the bundle in ``out`` with what is done so far: a window cut short still returns it."""
        (self.staging / "order.json").write_text(json.dumps(self.order))
        return bundle.pack(self.staging, self.out, self.manifest(complete), self.log.text(), replace=True)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root.resolve()), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if self.device["kind"] == "cuda":
            env["TRITON_INTERPRET"] = "0"  # the compiled kernel is what is measured, never the interpreter
        else:
            env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def provenance(self, kind: str, name: str, status: str, command: list[str], sources=(), digest=None,
                   **extra: Any) -> dict[str, Any]:  # fmt: skip
        return dict(kind=kind, name=name, status=status, command=command, window=self.window, date=_now_iso(),
                    dry_run=self.dry, commit=self.commit, device=self.device, sources=sorted(set(sources)),
                    source_hash=digest, evidence_command=self.argv, **extra)  # fmt: skip

    def piece(self, part: str, name: str, status: str, reason: str = "", **extra: Any) -> dict[str, Any]:
        record = dict(part=part, name=name, status=status, reason=reason, **extra)
        self.pieces.append(record)
        self.log(f"[{part}] {name}: {status}" + (f" — {reason}" if reason else ""))
        return record


class Proc:
    """A child process in its own session (so the whole group can be stopped), output to a log file."""

    live: set[Proc] = set()  # started and not yet seen to end: stopped if the command is interrupted

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = log.open("wb")
        self.p = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)  # fmt: skip
        self.cmd = cmd
        Proc.live.add(self)

    def poll(self) -> int | None:
        rc = self.p.poll()
        if rc is not None:
            self._out.close()
            Proc.live.discard(self)
        return rc

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the group, SIGKILL after ``grace`` seconds."""
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, sig)
                try:
                    self.p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.poll()

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None when it ran past ``timeout`` (then it is stopped)."""
        try:
            self.p.wait(max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        return self.poll()


def _history_wall(ctx: Ctx, part: str, name: str) -> float | None:
    """The latest measured duration of a piece on this device in results/ (any source version)."""
    base = ctx.results / ("checks" if part == "checks" else f"bench/{name}")
    walls = []
    for prov in base.glob(f"{ctx.device['slug']}-*/provenance.json"):
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(prov.read_text())
            walls.append((record["date"], float(record["wall_s"])))
    return max(walls)[1] if walls else None


# ---------------------------------------------------------------------------------------------- (a) checks
#: junit-xml child element of a test case -> its outcome (no child: passed).
_OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}


def _junit(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per-test outcomes and their counts from pytest's ``--junitxml`` report."""
    tests, summary = [], dict(passed=0, failed=0, error=0, skipped=0)
    if not path.is_file():
        return tests, summary
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in _OUTCOME:
                outcome, message = _OUTCOME[child.tag], (child.get("message") or child.text or "")[:2000]
        summary[outcome] += 1
        tests.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          time_s=float(case.get("time") or 0), message=message))  # fmt: skip
    return tests, summary


def piece_checks(ctx: Ctx) -> None:
    c = ctx.campaign
    digest = source_hash(ctx.root, c.checks_sources)
    folder = piece_folder("checks", ctx.device["slug"], digest)
    done = committed_folder(ctx.results, folder)
    if done is not None and "checks" not in ctx.redo:
        ctx.piece("checks", "test_cuda", "skipped", f"already in results/ for this device and code ({folder})")
        return
    estimate = _history_wall(ctx, "checks", "") or float(c.dry.get("checks_estimate_s", 10) if ctx.dry
                                                          else c.checks_estimate_s)  # fmt: skip
    left = ctx.budget.left()
    if estimate > left:
        ctx.piece(
            "checks", "test_cuda", "skipped", f"estimated {estimate:.0f} s > {left:.0f} s left", estimate_s=estimate
        )
        return
    junit = ctx.work / "checks.xml"
    cmd = [sys.executable, "-m", "pytest", *c.checks_args, f"--junitxml={junit}"]
    t0 = time.monotonic()
    proc = Proc(cmd, ctx.work / "checks.out", ctx.child_env(), ctx.root)
    rc = proc.wait(min(c.checks_limit_s, left))
    wall = time.monotonic() - t0
    output = bundle.read_text_tail(ctx.work / "checks.out")
    if rc is None:
        ctx.piece("checks", "test_cuda", "killed", f"ran past its limit of {min(c.checks_limit_s, left):.0f} s",
                  wall_s=wall, output_tail=output[-4000:])  # fmt: skip
        return
    tests, summary = _junit(junit)
    status = "done" if rc == 0 else "failed"
    command = ["python", "-m", "pytest", *c.checks_args]
    out = ctx.staging / folder
    out.mkdir(parents=True)
    (out / "checks.json").write_bytes(bundle.json_bytes(dict(exit_status=rc, summary=summary, tests=tests)))
    (out / "output.txt").write_text(output)
    env = "TRITON_INTERPRET=0 " if ctx.device["kind"] == "cuda" else ""
    prov = ctx.provenance("checks", "test_cuda", status, command, c.checks_sources, digest, wall_s=wall,
                          reproduce=f"{env}python -m pytest {' '.join(c.checks_args)}", summary=summary)  # fmt: skip
    (out / "provenance.json").write_bytes(bundle.json_bytes(prov))
    ctx.order.append(folder)
    what = ", ".join(f"{v} {k}" for k, v in summary.items() if v) or "no tests"
    ctx.piece("checks", "test_cuda", status, what if rc == 0 else f"pytest exit status {rc}: {what}",
              wall_s=wall, folder=folder)  # fmt: skip


# ---------------------------------------------------------------------------------------------- (b) benchmarks
def piece_bench(ctx: Ctx) -> None:
    c = ctx.campaign
    todo = []
    for spec in c.bench:
        digest = source_hash(ctx.root, spec.sources)
        folder = piece_folder("bench", ctx.device["slug"], digest, spec.name)
        if committed_folder(ctx.results, folder) is not None and "bench" not in ctx.redo:
            ctx.piece("bench", spec.name, "skipped", f"already in results/ for this device and code ({folder})")
            continue
        estimate = _history_wall(ctx, "bench", spec.name) or float(c.dry.get("bench_estimate_s", 8) if ctx.dry
                                                                    else spec.estimate_s)  # fmt: skip
        args = list(c.bench_smoke_args if ctx.dry else spec.args)
        out = str(ctx.work / "bench" / spec.name)
        todo.append(dict(name=spec.name, script=spec.script, args=args, estimate_s=estimate, folder=folder,
                         digest=digest, sources=list(spec.sources), out=out))  # fmt: skip
    if not todo:
        return
    limit = min(c.bench_limit_s, ctx.budget.left())
    if limit < WORKER_START_S + min(t["estimate_s"] for t in todo):
        for t in todo:
            ctx.piece("bench", t["name"], "skipped", f"estimated {WORKER_START_S:.0f} s to start the benchmark process "
                      f"+ {t['estimate_s']:.0f} s > {limit:.0f} s left", estimate_s=t["estimate_s"])  # fmt: skip
        return
    spec_file = ctx.work / "bench_spec.json"
    # An absolute deadline (the wall clock both processes share): the worker's own start-up counts against it.
    spec_file.write_text(json.dumps(dict(scripts=todo, deadline=time.time() + limit), indent=1))
    t0 = time.monotonic()
    proc = Proc([sys.executable, "-m", "train.evidence", "bench-worker", str(spec_file)], ctx.work / "bench.out",
                ctx.child_env(), ctx.root)  # fmt: skip
    rc = proc.wait(limit)  # the worker keeps to the deadline itself; this is the backstop
    for t in todo:
        status_file = Path(t["out"]) / "status.json"
        if not status_file.is_file():
            why = "the benchmark process was stopped at its limit" if rc is None else f"not reached (worker exit {rc})"
            ctx.piece("bench", t["name"], "killed" if rc is None else "skipped", why, estimate_s=t["estimate_s"])
            continue
        st = json.loads(status_file.read_text())
        if st["status"] == "skipped":
            ctx.piece("bench", t["name"], "skipped", st["reason"], estimate_s=t["estimate_s"])
            continue
        out = ctx.staging / t["folder"]
        out.mkdir(parents=True)
        result = Path(t["out"]) / "result.json"
        if result.is_file():
            shutil.copy(result, out / "result.json")
        (out / "output.txt").write_text(bundle.read_text_tail(Path(t["out"]) / "output.txt"))
        command = ["python", t["script"], *t["args"], "--json", "result.json"]
        prov = ctx.provenance("bench", t["name"], st["status"], command, t["sources"], t["digest"],
                              wall_s=st["wall_s"], reproduce=" ".join(command), error=st.get("error"))  # fmt: skip
        (out / "provenance.json").write_bytes(bundle.json_bytes(prov))
        ctx.order.append(t["folder"])
        ctx.piece("bench", t["name"], st["status"], st.get("error", "")[-300:], wall_s=st["wall_s"],
                  folder=t["folder"])  # fmt: skip
    ctx.log(f"[bench] {time.monotonic() - t0:.0f} s in all")


def bench_worker(spec_file: Path) -> int:
    """Run each benchmark script in this one process (one interpreter and import for all, the GPU state freed
    between them), each only if its estimate fits the time left; write status.json per script."""
    import runpy

    spec = json.loads(spec_file.read_text())
    deadline = float(spec["deadline"])  # time.time() of the driver's deadline for this part
    sys.path.insert(0, str(Path("bench").resolve()))
    for t in spec["scripts"]:
        out = Path(t["out"])
        out.mkdir(parents=True, exist_ok=True)
        left = deadline - time.time()
        if t["estimate_s"] > left:
            status = dict(status="skipped", reason=f"estimated {t['estimate_s']:.0f} s > {left:.0f} s left")
            (out / "status.json").write_text(json.dumps(status))
            continue
        argv = [t["script"], *t["args"], "--json", str(out / "result.json")]
        print(f"=== {' '.join(argv)}", flush=True)
        t0 = time.monotonic()
        status = dict(status="done")
        with (out / "output.txt").open("w") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
            saved = sys.argv
            sys.argv = argv
            try:
                runpy.run_path(t["script"], run_name="__main__")
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    status = dict(status="failed", error=str(exc.code))
            except Exception:  # a benchmark that breaks is a result to report, not a reason to stop the others
                status = dict(status="failed", error=traceback.format_exc()[-4000:])
            finally:
                sys.argv = saved
        _free_gpu()
        status["wall_s"] = time.monotonic() - t0
        (out / "status.json").write_text(json.dumps(status))
    return 0


class _Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _free_gpu() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- (c) runs
def timing_model(ctx: Ctx) -> TimingModel:
    """The campaign's priors, then what the benchmarks and earlier windows measured on this device."""
    model = TimingModel(ctx.campaign.run_priors(ctx.dry))
    name = ctx.device["name"]
    for result in sorted(ctx.results.glob(f"bench/train_step/{ctx.device['slug']}-*/result.json")):
        with contextlib.suppress(ValueError, KeyError, StopIteration):
            rows = json.loads(result.read_text())["rows"]
            ms = next(r["ms_per_step"] for r in rows if r["variant"].startswith("InstrumentedAdamW"))
            model.learn_step_ms("gpt_neox", ms * 1.05, "bench")  # + logging, fits and evals (5%, until measured)
    # Earlier windows on this device, oldest first (the latest measurement of a kind wins): every run they started,
    # finished or stopped, and the slowdowns they measured.
    windows = []
    for f in ctx.results.glob("windows/*.json"):
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

    def __init__(self, ctx: Ctx, specs: dict[str, dict[str, Any]]) -> None:
        self.ctx, self.specs, self.procs = ctx, specs, {}

    def start(self, name: str) -> Proc:
        spec_file = self.ctx.work / "specs" / f"{name}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(self.specs[name], indent=1))
        proc = Proc([sys.executable, "-m", "train.evidence", "worker-run", str(spec_file)],
                    self.ctx.work / "logs" / f"{name}.log", self.ctx.child_env(), self.ctx.root)  # fmt: skip
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


def _failed_checks(ctx: Ctx) -> str | None:
    """Where the kernel checks of this device and kernel source failed, in this window or as committed."""
    for p in ctx.pieces:
        if p["part"] == "checks" and p["status"] == "failed":
            return f"this window: {p['reason']}"
    folder = piece_folder("checks", ctx.device["slug"], source_hash(ctx.root, ctx.campaign.checks_sources))
    committed = committed_folder(ctx.results, folder)
    if committed is not None and json.loads((committed / "provenance.json").read_text())["status"] == "failed":
        return f"results/{folder}"
    return None


def piece_runs(ctx: Ctx, only: list[str], max_runs: int | None, max_concurrent: int | None) -> dict[str, Any]:
    c = ctx.campaign
    states = {s.name: s for s in run_states(c, ctx.results, ctx.dry)}
    names = only or [r.name for r in c.runs]
    chosen = []
    for name in names:
        state = states[c.run(name).name]
        if state.state == "done" and "runs" not in ctx.redo:
            ctx.piece("runs", name, "skipped", f"already in results/ ({state.detail})")
        else:
            if state.state == "stale":
                ctx.log(f"[runs] {name}: {state.detail}; it runs again")
            chosen.append(c.run(name))
    if not chosen:
        return {}
    broken = _failed_checks(ctx)
    if broken and not ctx.force_runs:
        for run in chosen:
            ctx.piece("runs", run.name, "not started", f"the kernel checks failed on this device ({broken}): the runs "
                      "use that kernel; fix it first (or --force-runs)")  # fmt: skip
        return {}
    model = timing_model(ctx)
    ctx.log(f"[runs] run-time model: {json.dumps(model.summary())}")
    items, specs = [], {}
    work_runs = ctx.work / "runs"
    for run in chosen:
        extra = (f"run.out_dir={work_runs}", f"data.cache_dir={ctx.work / 'cache'}", "run.overwrite=true")
        cfg = resolve(c, run, ctx.dry, extra)
        steps = cfg.schedule.total_steps
        profile = RunProfile(cfg.model.arch, steps, snapshot_count(steps, cfg.checkpoint.every, cfg.checkpoint.early),
                             min(cfg.checkpoint.every, steps), run.spline)  # fmt: skip
        items.append(Item(run.name, profile))
        specs[run.name] = dict(
            name=run.name, config=run.config, overrides=run_overrides(c, run, ctx.dry, extra),
            run_dir=str(work_runs / run.name),
            staging=str(ctx.staging / "runs" / run.name), status_file=str(ctx.work / "status" / f"{run.name}.json"),
            spacings=list(c.spacings(ctx.dry)) if run.spline else None, group=run.group, why=run.why,
            spline=run.spline, reproduce=reproduce_command(c, run, ctx.dry), window=ctx.window, dry_run=ctx.dry,
            commit=ctx.commit, device=ctx.device, evidence_command=ctx.argv,
        )  # fmt: skip
    launcher = RunLauncher(ctx, specs)
    profiles = {i.name: i.profile for i in items}

    def settle(o: Outcome) -> None:
        """A run's outcome into the bundle: a complete run's folder (with the scheduler's timing), else the reason
        and the end of its output; the bundle in --out is rewritten at once, so a window cut short keeps it."""
        kind = dict(arch=profiles[o.name].arch, spline=profiles[o.name].spline)  # what later windows learn from
        folder = ctx.staging / "runs" / o.name
        record_file = folder / "run.json"
        shutil.rmtree(work_runs / o.name, ignore_errors=True)  # checkpoints never leave the machine
        if o.status == "done" and record_file.is_file():
            record = json.loads(record_file.read_text())
            record["timing"]["scheduler"] = o.timing
            record_file.write_bytes(bundle.json_bytes(record))
            ctx.order.append(f"runs/{o.name}")
            ctx.piece("runs", o.name, "done", f"{o.timing.get('wall_s', 0):.0f} s", timing=o.timing, **kind,
                      folder=f"runs/{o.name}", errors=record.get("errors"))  # fmt: skip
        else:
            if folder.exists():
                shutil.rmtree(folder)  # only complete runs are results
            log = ctx.work / "logs" / f"{o.name}.log"
            tail = bundle.read_text_tail(log, 4000) if o.name in launcher.procs else ""
            status = "failed" if o.status == "done" else o.status
            reason = o.reason or ("the worker wrote no run.json" if o.status == "done" else "")
            ctx.piece("runs", o.name, status, reason, timing=o.timing, output_tail=tail, **kind)
        ctx.calibration = dict(measurements=scheduler.measurements, model=model.summary())
        ctx.checkpoint()

    fast = ctx.dry  # demo-size runs: measure over seconds, not tens of seconds
    concurrent = max_concurrent or int(c.dry.get("max_concurrent", 1) if ctx.dry else c.max_concurrent)
    scheduler = Scheduler(
        items, ctx.budget, model, launcher, max_concurrent=concurrent, measure_s=3.0 if fast else 20.0,
        warmup_s=1.0 if fast else 5.0, poll_s=0.5 if fast else 2.0, max_starts=max_runs,
        free_gpu_gib=_free_gpu_gib if ctx.device["kind"] == "cuda" else (lambda: None),
        free_disk_gib=lambda: shutil.disk_usage(ctx.work).free / 2**30, log=ctx.log, on_finish=settle,
    )  # fmt: skip
    ctx.calibration = dict(measurements=scheduler.measurements, model=model.summary())
    try:
        outcomes = scheduler.run()
    finally:  # whatever happens here, no run outlives the command (they run in their own sessions)
        for job in list(scheduler.running):
            job.handle.stop()
            settle(Outcome(job.item.name, "stopped", "the command was interrupted", {}))
    for o in outcomes:
        if o.status == "not started":
            ctx.piece("runs", o.name, "not started", o.reason, arch=profiles[o.name].arch)
    ctx.calibration = dict(measurements=scheduler.measurements, model=model.summary())
    return ctx.calibration


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
        from instrumented_adamw.analysis import analyze_run
        from instrumented_adamw.report import make_report

        from .config import load_config
        from .loop import train

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
    from instrumented_adamw.runs import load_run

    out = Path(spec["staging"])
    if out.exists():
        shutil.rmtree(out)
    (out / "figures").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    shutil.copy(run_dir / "env.json", out / "env.json")
    sizes = {}
    for kind in ("metrics", "forces", "weibull"):
        if (run_dir / f"{kind}.jsonl").is_file():
            sizes[f"{kind}.jsonl.xz"] = bundle.compact_jsonl(run_dir / f"{kind}.jsonl", out / f"{kind}.jsonl.xz")
    produced = run_dir / "analysis" / "analysis.json"
    text = produced.read_text() if produced.is_file() else json.dumps(dict(error="the analysis failed: see run.json"))
    if len(text) > 64 * 1024:  # a 20k-step run's RMS budgets: every interval of two classes
        (out / "analysis.json.xz").write_bytes(lzma.compress(text.encode(), preset=6))
    else:
        (out / "analysis.json").write_text(text)
    # Figures come back for a look; results/ does not commit them (instrumented-adamw report redraws them from the
    # logs). The analysis's closed-loop figure is the report's closed_loop_<run>.png again.
    pngs = [*(run_dir / "report").glob("*.png"), *(run_dir / "analysis").glob("spline_recovery.png")]
    for png in pngs:
        shutil.copy(png, out / "figures" / png.name)
    run = load_run(run_dir)
    last = run.metrics[-1] if run.metrics else {}
    tok_s = sorted(m["throughput(tok/s)"] for m in run.metrics if m.get("throughput(tok/s)"))
    val = [m["val_loss"] for m in run.metrics if m.get("val_loss") is not None]
    summary = dict(steps=last.get("step"), final_loss=last.get("loss"), final_val_loss=val[-1] if val else None,
                   median_tok_s=tok_s[len(tok_s) // 2] if tok_s else None,
                   transmission_align_share=last.get("Transmission/align_share"))  # fmt: skip
    plain = json.loads(json.dumps(cfg.to_dict(), default=list))
    return dict(kind="run", name=spec["name"], status="done", group=spec["group"], why=spec["why"],
                spline=spec["spline"], window=spec["window"], date=_now_iso(), dry_run=spec["dry_run"],
                commit=spec["commit"], device=spec["device"], command=spec["evidence_command"],
                reproduce=spec["reproduce"], env=json.loads((run_dir / "env.json").read_text()), config=plain,
                config_digest=config_digest(cfg), summary=summary, log_bytes=sizes,
                skipped={k: v for k, v in report.get("skipped", {}).items()},
                spline_status=analysis.get("spline", {}).get("skipped", "done") if analysis else "failed")  # fmt: skip


# ---------------------------------------------------------------------------------------------- run
def ensure_tokens(root: Path, log: Log) -> None:
    """On the device machine: the carried, compressed token file back into .gpu/tokens/ (checked by size)."""
    src, dst = root / CARRY, root / TOKENS
    if (dst / "train.bin").is_file() or not (src / "train.bin.xz").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with lzma.open(src / "train.bin.xz") as fin, (dst / "train.bin.tmp").open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 * bundle.MIB)
    meta = json.loads((src / "tokens.json").read_text())
    size = (dst / "train.bin.tmp").stat().st_size
    if size != 2 * meta["train_tokens"]:
        raise RuntimeError(f"{src}/train.bin.xz unpacked to {size} bytes, not {2 * meta['train_tokens']}: damaged")
    os.replace(dst / "train.bin.tmp", dst / "train.bin")
    for name in ("valid.bin", "tokens.json"):
        shutil.copy(src / name, dst / name)
    log(f"[tokens] {meta['train_tokens']:,} training tokens unpacked into {TOKENS} in {time.monotonic() - t0:.1f} s")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def command_run(args: argparse.Namespace) -> int:
    log = Log()
    root = Path(args.root)
    argv = ["python", "-m", "train.evidence", *sys.argv[1:]]
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS)) + sorted(set(args.redo.split(",")) - set(PARTS) - {""})
    if bad:
        print(f"error: unknown part(s) {bad}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty: the bundle must be the only thing in it", file=sys.stderr)
        return 2
    campaign = load_campaign(args.campaign, root)
    device = detect_device(force_dry=args.dry_run)
    dry = device["kind"] != "cuda"
    reserve = float(campaign.dry.get("pack_reserve_s", 3) if dry else campaign.pack_reserve_s)
    budget = Budget(args.budget, reserve_s=reserve)
    window = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{device['slug']}"
    if dry:
        log("DRY RUN: " + ("--dry-run given" if args.dry_run else "no CUDA device") + " — every piece runs its CPU "
            "stand-in (smoke benchmarks, demo-size runs). Nothing here is evidence; the bundle unpacks into "
            "results/dry_run/.")  # fmt: skip
    log(f"window {window}: {device['name']}, budget {args.budget:.0f} s ({reserve:.0f} s kept for packing), "
        f"parts {','.join(parts)}")  # fmt: skip
    results = Path(args.results) / ("dry_run" if dry else "")
    # Scratch: on the GPU machine inside the checkout (a spline run's snapshots are 23 GB: the disk, not a tmpfs);
    # for a dry run a temporary directory.
    if args.work:
        work = Path(args.work)
    elif dry:
        work = Path(tempfile.mkdtemp(prefix="evidence-"))
    else:
        work = root / ".gpu" / "work" / window
    work.mkdir(parents=True, exist_ok=True)
    staging = work / "bundle"
    staging.mkdir(exist_ok=True)
    ctx = Ctx(root=root, results=results, campaign=campaign, device=device, commit=commit_info(root), window=window,
              dry=dry, budget=budget, log=log, work=work, staging=staging,
              redo={p for p in args.redo.split(",") if p}, argv=argv, out=out, parts=parts,
              force_runs=args.force_runs)  # fmt: skip
    if ctx.commit.get("dirty"):
        log(f"note: the tree differs from commit {ctx.commit['sha']}: {ctx.commit['dirty'][:5]}")
    only = [n for n in (args.runs or "").split(",") if n]
    for name in only:
        campaign.run(name)  # a misspelt name fails now, not after the checks
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill from outside still packs what is done
    try:
        ctx.checkpoint()
        if "checks" in parts:
            piece_checks(ctx)
            ctx.checkpoint()
        if "bench" in parts:
            piece_bench(ctx)
            ctx.checkpoint()
        if "runs" in parts:
            if not dry:
                ensure_tokens(root, log)
            piece_runs(ctx, only, args.max_runs, args.max_concurrent)
    except KeyboardInterrupt:
        log("interrupted: stopping what runs, packing what is done")
        for proc in list(Proc.live):
            proc.stop(grace=2.0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = ctx.checkpoint(complete=True)
    _print_summary(ctx, written, out)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
        if not dry:
            with contextlib.suppress(OSError):
                work.parent.rmdir()  # .gpu/work, when empty
    return 1 if any(p["status"] in ("failed", "killed") for p in ctx.pieces) else 0


def _print_summary(ctx: Ctx, manifest: dict, out: Path) -> None:
    print(f"\n{'part':<7} {'piece':<34} {'status':<12} reason")
    for p in ctx.pieces:
        print(f"{p['part']:<7} {p['name']:<34} {p['status']:<12} {p.get('reason', '')[:150]}")
    files = sorted(out.iterdir())
    total = sum(f.stat().st_size for f in files)
    print(f"\nbundle {out}: {len(files)} files, {total / bundle.MIB:.2f} MiB in {ctx.budget.elapsed():.0f} s "
          f"of a {ctx.budget.total_s:.0f} s budget" + (" (DRY RUN: not evidence)" if ctx.dry else ""))  # fmt: skip
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
    print("next: instrumented-adamw results   (regenerates docs/results.md and docs/benchmarks.md), then commit "
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
        from .config import load_config
        from .data import export_tokens

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
    (carry / "commit.json").write_text(json.dumps(dict(sha=commit["sha"], dirty=commit["dirty"], date=_now_iso()),
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
DEVICE_COMMAND = 'PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m train.evidence run --out "$OUT" --budget 540'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evidence", description=__doc__.splitlines()[0])
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
