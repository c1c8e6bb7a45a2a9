"""The run directory: one launch at a time, and an explicit decision before anything in it is rewritten.

A launch locks ``RUN_DIR/.lock`` (``fcntl.flock``: released by the kernel when the holder dies, so a killed run
leaves no stale lock) and then plans its start before writing anything:

* **continue** from the newest resume state that passes verification (``train.checkpoint``), if ``run.resume``
  (the default) — refused with a diff if the config differs from the run's, unless ``run.allow_config_change``;
* **start fresh** in an empty directory, or one that holds only the step-0 outputs of a start that was killed
  before its first resume state (they are rewritten identically);
* **refuse** otherwise — a directory holding logs, snapshots or states past step 0 with no usable resume state,
  or any at all with ``run.resume=false`` — with what was found and the options, unless ``run.overwrite=true``
  (then the run's outputs are deleted first).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instrumented_adamw.sinks import KINDS, read_jsonl
from instrumented_adamw.utils.durable_io import check_prefix, fsync_dir, truncate_durably, verify_manifest
from train import checkpoint as ckpt
from train.config import RESUME_FREE_FIELDS, Config

#: Append-only logs of a run; each resume state records their length and checksum.
LOG_FILES = (*(f"{kind}.jsonl" for kind in KINDS), "config_changes.jsonl")
#: Everything a run writes into its directory (``.lock`` aside); ``run.overwrite=true`` deletes these.
OUTPUTS = (*LOG_FILES, "config.yaml", "env.json", "checkpoints", "resume", "report", "tensorboard", "wandb")
LOCK = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what it holds and what the options are."""


class RunLockedError(RunDirError):
    """Another launch holds the run directory."""


class ConfigChangedError(RunDirError):
    """A resumed run's config differs from the one it was run with."""


# ---------------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` for the duration; a second launch is refused at once, naming the holder."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    fh = (run_dir / LOCK).open("a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        try:
            info = json.loads(holder)
            who = f"pid {info['pid']} on {info['host']}, started {info['started']}: {' '.join(info['argv'])}"
        except (ValueError, KeyError, TypeError):
            who = "a process that is just starting"
        raise RunLockedError(
            f"{run_dir} is in use by another launch ({who}). Wait for it to finish or stop it, or give this run "
            "another run.name."
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        fh.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=started, argv=sys.argv)))
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)  # the file stays: deleting it would let two launches lock different inodes
        fh.close()


# ---------------------------------------------------------------------------------------------- what is there
@dataclass
class Survey:
    """What a run directory holds, for messages; ``past_start``: anything beyond the step-0 outputs."""

    lines: list[str] = field(default_factory=list)
    past_start: bool = False
    present: list[str] = field(default_factory=list)


def survey(run_dir: Path) -> Survey:
    out = Survey()
    for name in LOG_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        out.present.append(name)
        try:
            steps = [int(r["step"]) for r in read_jsonl(path)]
        except (ValueError, KeyError, TypeError) as exc:
            out.lines.append(f"{name}: unreadable ({exc})")
            out.past_start |= path.stat().st_size > 0
            continue
        if steps:
            out.lines.append(f"{name}: {len(steps)} records, steps {min(steps)}..{max(steps)}")
        out.past_start |= any(s > 0 for s in steps) or (name == "config_changes.jsonl" and bool(steps))
    for sub, what in (("checkpoints", "snapshots"), ("resume", "resume states")):
        root = run_dir / sub
        if not root.is_dir():
            continue
        out.present.append(sub)
        steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := re.match(r"step_(\d+)", p.name)))
        if steps:
            out.lines.append(f"{sub}/: {len(steps)} {what} (finished or not), steps {steps[0]}..{steps[-1]}")
        out.past_start |= any(s > 0 for s in steps)
    for name in ("config.yaml", "env.json", "report", "tensorboard", "wandb"):
        if (run_dir / name).exists():
            out.present.append(name)
            out.past_start |= name == "report"
    return out


def clear_outputs(run_dir: Path, names: list[str]) -> None:
    for name in names:
        ckpt.remove(run_dir / name)
    fsync_dir(run_dir)


# ---------------------------------------------------------------------------------------------- config
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = list(value) if isinstance(value, tuple) else value
    return out


def _significant(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _flatten(tree).items() if k not in RESUME_FREE_FIELDS}


def plain_config(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON values (lists for tuples): what resume states store."""
    return json.loads(json.dumps(cfg.to_dict()))


def config_diff(old: dict[str, Any], new: Config) -> dict[str, tuple[Any, Any]]:
    """``field: (old, new)`` for every field that differs, except those free to differ between launches."""
    a, b = _flatten(old), _flatten(plain_config(new))
    missing = "(absent)"
    return {
        k: (a.get(k, missing), b.get(k, missing))
        for k in sorted(a.keys() | b.keys())
        if k not in RESUME_FREE_FIELDS and a.get(k, missing) != b.get(k, missing)
    }


# ---------------------------------------------------------------------------------------------- the decision
@dataclass
class StartPlan:
    state: ckpt.ResumeState | None  # continue from it; None: start fresh
    notes: list[str]  # what the launch reports (fallbacks, repairs)
    clear: list[str]  # outputs to delete before a fresh start
    config_change: dict[str, tuple[Any, Any]]  # accepted differences, recorded with the step


def plan_start(cfg: Config, run_dir: Path) -> StartPlan:
    """Decide how this launch starts; raises :class:`RunDirError` instead of rewriting anything it should not."""
    if cfg.run.overwrite:
        found = survey(run_dir)
        notes = [f"run.overwrite=true: deleting {', '.join(found.present)}"] if found.present else []
        return StartPlan(None, notes, found.present, {})
    accepted: list[str] = []
    log_rejections = []

    def check_logs(state: ckpt.ResumeState) -> str | None:
        for name, mark in state.logs.items():
            problem = check_prefix(run_dir / name, mark)
            if problem is None:
                continue
            if cfg.run.accept_damaged_logs:
                accepted.append(f"run.accept_damaged_logs=true: continuing from step {state.step} although {problem}")
                continue
            log_rejections.append(name)
            return problem
        return None

    state, notes = ckpt.find_resume_state(run_dir, check_logs) if cfg.run.resume else (None, [])
    notes += accepted
    if state is not None:
        changes = config_diff(state.config, cfg)
        if changes and not cfg.run.allow_config_change:
            diff = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ConfigChangedError(
                f"{run_dir}: the config differs from the one this run used up to step {state.step}:\n{diff}\n"
                f"Options: rerun with the run's values (as in {run_dir / 'config.yaml'}); or add "
                f"run.allow_config_change=true to continue from step {state.step} with the new values (the change is "
                "recorded in config_changes.jsonl); or start a separate run under another run.name."
            )
        return StartPlan(state, notes, [], changes)
    found = survey(run_dir)  # parses every log: only on this path, never on an ordinary resume
    if not found.past_start:
        if found.present:
            notes.append(
                "starting fresh: the directory holds only what a start killed before its first resume state wrote "
                f"({', '.join(found.present)}), which is rewritten identically"
            )
        return StartPlan(None, notes, found.present, {})
    listing = "\n".join(f"  {line}" for line in found.lines + notes)
    if not cfg.run.resume:
        raise RunDirError(
            f"run.resume=false, but {run_dir} holds an earlier run:\n{listing}\nOptions: run.resume=true to continue "
            "it; run.overwrite=true to delete it and start over; or another run.name to keep it."
        )
    extra = ""
    if log_rejections:
        extra = (
            " run.accept_damaged_logs=true to continue anyway, keeping the logs as they are (records may be "
            "missing or wrong);"
        )
    raise RunDirError(
        f"{run_dir} holds the outputs of an earlier run but no usable resume state:\n{listing}\nOptions: restore "
        f"the resume states (resume/) or logs from a copy;{extra} run.overwrite=true to delete these outputs and "
        "start over; or another run.name to keep them."
    )


def prepare(plan: StartPlan, cfg: Config, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Bring the directory to the plan's starting point (rank 0, after the state is loaded); returns the marks the
    JSONL sink cuts its files back to (``None`` for a fresh start)."""
    from train.config import dump_config

    if plan.clear:
        clear_outputs(run_dir, plan.clear)
    marks = None
    if plan.state is not None:
        step = plan.state.step
        marks = {}
        for name in LOG_FILES:
            mark = plan.state.logs.get(name, dict(bytes=0))
            path = run_dir / name
            size = path.stat().st_size if path.is_file() else 0
            if size < mark["bytes"]:  # only with run.accept_damaged_logs: keep what is left
                mark = dict(bytes=size)
            marks[name] = mark
        changes = run_dir / "config_changes.jsonl"
        if changes.is_file():
            truncate_durably(changes, marks["config_changes.jsonl"]["bytes"])
        # Outputs of the steps after the resume point are rewritten by this launch; unfinished writes go.
        for sub in ("checkpoints", "resume"):
            root = run_dir / sub
            for path in sorted(root.iterdir()) if root.is_dir() else []:
                later = sub == "checkpoints" and (ckpt.dir_step(path) or 0) > step
                if path.name.endswith(".tmp") or later:
                    ckpt.remove(path)
        for snap in sorted((run_dir / "checkpoints").glob("step_*")):
            problems = verify_manifest(snap, full=False)  # sizes only: hashing every snapshot would be slow
            if problems:
                plan.notes.append(
                    f"checkpoints/{snap.name} is damaged ({'; '.join(problems)}): the run is past it, so it cannot be "
                    "rewritten; analyses that load it refuse it"
                )
        try:
            written = yaml.safe_load((run_dir / "config.yaml").read_text())
            if not plan.config_change and _significant(written) != _significant(plan.state.config):
                plan.notes.append("config.yaml differed from the run's config (edited or damaged): rewritten")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            plan.notes.append("config.yaml was missing or unreadable: rewritten")
        if plan.config_change:
            record = dict(step=step, time=time.time(), changes={k: dict(old=o, new=n) for k, (o, n) in
                                                                plan.config_change.items()})  # fmt: skip
            with changes.open("ab") as fh:
                fh.write((json.dumps(record) + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    return marks
