"""What one evidence window holds: the device and commit it runs on, its log, its budget, the pieces done so far and
the bundle rewritten after each; child processes that can be stopped as a group; the carried token files."""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import bundle
from experiments.campaign import Campaign, slug
from experiments.scheduler import Budget
from train import provenance

PARTS = ("checks", "bench", "runs")
#: Where ``prepare`` puts what a window carries (``carry=[".gpu/evidence"]``), and where the runs read tokens.
CARRY = Path(".gpu/evidence")
TOKENS = Path(".gpu/tokens")
#: What may travel to the device machine in all: the working tree plus carried paths.
TRAVEL_LIMIT = 64 * bundle.MIB
#: Seconds to start the benchmark process (interpreter, torch) before its first script: counted before launching it.
WORKER_START_S = 5.0


def detect_device(force_dry: bool = False) -> dict[str, Any]:
    """The GPU this command will use (or the CPU), with the versions a result depends on."""
    import torch

    cuda = torch.cuda.is_available() and not force_dry
    info: dict[str, Any] = dict(kind="cuda" if cuda else "cpu", cpu=provenance.cpu_name(), cpu_count=os.cpu_count())
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
    info["versions"] = provenance.versions()
    return info


def commit_info(root: Path) -> dict[str, Any]:
    """The commit the tree is at: from git where there is a repository, else from ``prepare``'s record (the
    device machine gets the working tree without .git)."""
    return provenance.commit_info(root, CARRY / "commit.json")


class EvidenceLog:
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
class Window:
    """One evidence window: what it runs on, its budget and scratch, and what it has done so far (the pieces, the
    bundle order, the run-time calibration), from which the bundle in ``out`` is rewritten after every piece."""

    root: Path
    results: Path  # results/ (real) or results/dry_run/ (dry run): where committed pieces are looked up
    campaign: Campaign
    device: dict[str, Any]
    commit: dict[str, Any]
    name: str  # the window's id: UTC start time and device
    dry: bool
    budget: Budget
    log: EvidenceLog
    work: Path
    staging: Path
    redo: set[str]
    argv: list[str]
    out: Path | None = None
    parts: list[str] = field(default_factory=list)
    pieces: list[dict[str, Any]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # bundle priority of result folders
    calibration: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=provenance.now_iso)
    force_runs: bool = False

    def manifest(self, complete: bool) -> dict[str, Any]:
        return dict(
            format=1,
            kind="instrumented-adamw evidence bundle",
            window=self.name,
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
        return dict(kind=kind, name=name, status=status, command=command, window=self.name, date=provenance.now_iso(),
                    dry_run=self.dry, commit=self.commit, device=self.device, sources=sorted(set(sources)),
                    source_hash=digest, evidence_command=self.argv, **extra)  # fmt: skip

    def piece(self, part: str, name: str, status: str, reason: str = "", **extra: Any) -> dict[str, Any]:
        record = dict(part=part, name=name, status=status, reason=reason, **extra)
        self.pieces.append(record)
        self.log(f"[{part}] {name}: {status}" + (f" — {reason}" if reason else ""))
        return record


class ChildProcess:
    """A child process in its own session (so the whole group can be stopped), output to a log file."""

    live: set[ChildProcess] = set()  # started and not yet seen to end: stopped if the command is interrupted

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = log.open("wb")
        self.p = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)  # fmt: skip
        self.cmd = cmd
        ChildProcess.live.add(self)

    def poll(self) -> int | None:
        rc = self.p.poll()
        if rc is not None:
            self._out.close()
            ChildProcess.live.discard(self)
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


def history_wall(win: Window, part: str, name: str) -> float | None:
    """The latest measured duration of a piece on this device in results/ (any source version)."""
    base = win.results / ("checks" if part == "checks" else f"bench/{name}")
    walls = []
    for prov in base.glob(f"{win.device['slug']}-*/provenance.json"):
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(prov.read_text())
            walls.append((record["date"], float(record["wall_s"])))
    return max(walls)[1] if walls else None


def ensure_tokens(root: Path, log: EvidenceLog) -> None:
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


def free_gpu_cache() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
