"""Checkpoints: numbered weight snapshots for analysis, and the resume states a killed run continues from.

* ``checkpoints/step_XXXXXX/`` — ``save_pretrained`` output (``config.json`` + ``model.safetensors``), so every
  snapshot is an HF model directory (``instrumented-adamw fit`` reads it); with ``save_optimizer`` also
  ``optimizer.pt`` (the Adam moments); and ``manifest.json`` (size and SHA-256 of every file).
* ``resume/step_XXXXXX/`` — ``model.safetensors`` (weights), ``state.pt`` (optimizer state, RNG states, the
  config the run had, the monitor's cumulative state, and the length and SHA-256 of every log at that moment) and
  ``manifest.json``; under FSDP a ``torch.distributed.checkpoint`` directory plus ``rank<N>.pt`` instead.
  ``resume/latest.json`` names the newest.

Every save is written into ``<name>.tmp``, checksummed, fsync'd (files and directory), renamed into place, and the
parent directory fsync'd, so a kill or a power cut at any moment leaves either the old directory or the complete
new one. Two resume states are kept (the new one and the last good one before it) and older ones are deleted only
after ``latest.json`` is durably switched, so a state damaged on disk has a fallback.

Loading verifies before it trusts: the manifest's checksums, then ``torch.load(weights_only=True)`` (a crafted file
cannot run code), then that every loaded tensor is finite and that the logs still hold what the state recorded.
The newest state that passes is used; the ones skipped are reported with the reason. ``latest.json`` is a hint
(a kill between the rename and the pointer switch leaves a complete newer state it does not name yet), checked to
name a state inside ``resume/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from instrumented_adamw.utils.durable_io import fsync_dir, read_manifest, verify_manifest, write_durably, write_manifest
from train.failpoints import fault_point

#: Version of the resume-state layout; states of another version are not loaded.
STATE_FORMAT = 2
#: Resume states kept on disk: the newest and the last good one before it.
KEEP_STATES = 2
POINTER = "latest.json"
_STATE_DIR = re.compile(r"step_(\d{6,})")


class StateError(RuntimeError):
    """A resume state cannot be used as it is (e.g. it was written by another distributed strategy)."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_name(step)


def dir_step(path: Path) -> int | None:
    """The step of a ``step_XXXXXX`` directory name (``None`` for any other name, ``.tmp`` ones included)."""
    match = _STATE_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _make_dir(path: Path) -> None:
    """``mkdir -p`` whose new entries are durable (the parent directory is fsync'd for each one created)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        fsync_dir(p.parent)


def remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _rename_into_place(tmp: Path, final: Path) -> None:
    remove(final)  # only a leftover that verification rejected (a good one at this step is never rewritten)
    os.replace(tmp, final)
    fsync_dir(final.parent)


# ---------------------------------------------------------------------------------------------- snapshots
def save_snapshot(run_dir: Path, step: int, model, optimizer=None, state_dict=None) -> Path:
    """Weights (safetensors, HF layout) of ``step``; the optimizer moments too when ``optimizer`` is given.

    ``state_dict`` (a gathered full state dict, e.g. under FSDP) is written instead of the model's own tensors."""
    final = snapshot_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    _make_dir(final.parent)
    remove(tmp)
    # save_pretrained writes the HF layout (config.json, model.safetensors, its key naming) in either case.
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_manifest(tmp, dict(step=step))
    fault_point("snapshot.written", step)
    _rename_into_place(tmp, final)
    fault_point("snapshot.renamed", step)
    return final


# ---------------------------------------------------------------------------------------------- resume states
@dataclass
class ResumeState:
    """A verified resume state, read but not yet applied to a model."""

    step: int
    directory: Path
    sharded: bool
    config: dict[str, Any]
    logs: dict[str, dict[str, Any]]  # log file name -> {"bytes", "sha256"} when the state was saved
    extra: dict[str, Any]
    optimizer: dict[str, Any] | None = None  # single-process states only (FSDP loads through DCP)
    rng: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None


def _rng_state() -> dict[str, Any]:
    rng: dict[str, Any] = dict(cpu=torch.get_rng_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_resume(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    *,
    config: dict[str, Any],
    logs: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    keep: str | None,
) -> str:
    """Write the resume state of ``step`` durably and switch ``latest.json`` to it; returns its directory name.

    ``config`` (the run's resolved config as plain values), ``logs`` (marks of the log files) and ``extra`` (e.g.
    the monitor's cumulative state) ride along in ``state.pt``. ``keep`` names the last good state, which stays on
    disk beside the new one; every other state is deleted once the new one is committed."""
    root = run_dir / "resume"
    _make_dir(root)
    tmp = root / (step_name(step) + ".tmp")
    remove(tmp)
    tmp.mkdir()
    # Tensors that share storage (tied embeddings) are saved once per name: clone to plain contiguous tensors.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    meta = dict(format=STATE_FORMAT, step=step, config=config, logs=logs, extra=extra)
    torch.save(dict(meta, optimizer=optimizer.state_dict(), rng=_rng_state()), tmp / "state.pt")
    write_manifest(tmp, dict(format=STATE_FORMAT, step=step))
    fault_point("resume.written", step)
    return _commit(root, tmp, step, keep, sharded=False)


def _commit(root: Path, tmp: Path, step: int, keep: str | None, sharded: bool) -> str:
    final = root / step_name(step)
    _rename_into_place(tmp, final)
    fault_point("resume.renamed", step)
    write_durably(root / POINTER, json.dumps(dict(step=step, dir=final.name, sharded=sharded)).encode())
    fault_point("resume.pointer", step)
    for old in root.iterdir():
        if old.name not in (final.name, keep, POINTER):
            remove(old)
    fsync_dir(root)
    return final.name


def save_resume_sharded(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    *,
    config: dict[str, Any],
    logs: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    keep: str | None,
) -> str:
    """FSDP2 resume state with torch.distributed.checkpoint: every rank writes its shards and ``rank<N>.pt`` (its
    RNG state; rank 0's also the config, log marks and ``extra``); once all have finished, rank 0 checksums the
    directory and commits it like a single-process state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    rank = dist.get_rank()
    root = run_dir / "resume"
    tmp = root / (step_name(step) + ".tmp")
    if rank == 0:
        _make_dir(root)
        remove(tmp)
        tmp.mkdir()
    dist.barrier()
    has_optim = bool(optimizer.state)
    if has_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    else:  # step 0: Adam has no state yet, and get_state_dict would create it by taking a step (of lr 0)
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
    local: dict[str, Any] = dict(format=STATE_FORMAT, step=step, rng=_rng_state(), extra=extra, optim=has_optim)
    if rank == 0:
        local.update(config=config, logs=logs)
    torch.save(local, tmp / f"rank{rank}.pt")
    dist.barrier()
    name = step_name(step)
    if rank == 0:
        write_manifest(tmp, dict(format=STATE_FORMAT, step=step, sharded=True, world_size=dist.get_world_size()))
        fault_point("resume.written", step)
        name = _commit(root, tmp, step, keep, sharded=True)
    dist.barrier()
    return name


def read_pointer(run_dir: Path) -> tuple[str | None, str | None]:
    """(directory name that ``latest.json`` names, problem): the name only if it is a state directory inside
    ``resume/``; otherwise ``None`` and why not (missing, unreadable, pointing elsewhere)."""
    root = run_dir / "resume"
    path = root / POINTER
    if not path.is_file():
        return None, f"resume/{POINTER} is missing"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        name = info["dir"]
        step = int(info["step"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, f"resume/{POINTER} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(name, str) or _STATE_DIR.fullmatch(name) is None or dir_step(Path(name)) != step:
        return None, f"resume/{POINTER} names {name!r}, which is not a resume state directory of step {step}"
    if (root / name).resolve().parent != root.resolve():
        return None, f"resume/{POINTER} points outside resume/ ({name!r})"
    if not (root / name).is_dir():
        return None, f"resume/{POINTER} names {name}, which does not exist"
    return name, None


def latest_resume_step(run_dir: Path) -> int | None:
    """The step ``latest.json`` names (``None`` when it is missing or unusable); a quick look, nothing verified."""
    name, _ = read_pointer(run_dir)
    return None if name is None else dir_step(Path(name))


def state_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking resume state directories, newest first (``.tmp`` ones are unfinished writes; a symlink to a
    directory elsewhere is not one of this run's states)."""
    root = run_dir / "resume"
    if not root.is_dir():
        return []
    inside = root.resolve()
    found = [p for p in root.iterdir() if p.is_dir() and dir_step(p) is not None and p.resolve().parent == inside]
    return sorted(found, key=lambda p: -dir_step(p))


def _nonfinite(tensors: dict[str, Any], prefix: str = "") -> str | None:
    """Name of the first floating-point tensor in a nested structure with a NaN or Inf, else ``None``."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name
        elif isinstance(value, (dict, list, tuple)):
            found = _nonfinite(value, f"{name}.")
            if found is not None:
                return found
    return None


def read_state(directory: Path, verify: bool = True, device: str = "cpu") -> ResumeState:
    """Read one resume state: checksums (``verify``), then its files with ``weights_only=True``, then finiteness.
    Raises ``ValueError`` saying what is wrong."""
    if verify:
        problems = verify_manifest(directory)
        if problems:
            raise ValueError("; ".join(problems))
    manifest = read_manifest(directory) if verify else {}
    sharded = bool(manifest.get("sharded")) or (directory / "rank0.pt").is_file()
    meta_file = directory / ("rank0.pt" if sharded else "state.pt")
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: it names itself in the message
        raise ValueError(f"{meta_file.name} cannot be loaded ({type(exc).__name__}: {exc})") from None
    step = dir_step(directory)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or meta.get("step") != step:
        raise ValueError(f"{meta_file.name} is not a format-{STATE_FORMAT} resume state of step {step}")
    try:
        state = ResumeState(step=step, directory=directory, sharded=sharded, config=dict(meta["config"]),
                            logs=dict(meta["logs"]), extra=dict(meta["extra"]), rng=dict(meta["rng"]))  # fmt: skip
        if not sharded:
            state.optimizer = dict(meta["optimizer"])
            state.optimizer["state"], state.optimizer["param_groups"]  # noqa: B018 - both must be there
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_file.name} lacks part of a resume state ({type(exc).__name__}: {exc})") from None
    if not sharded:
        try:
            state.weights = load_file(directory / "model.safetensors", device=device)
        except Exception as exc:
            raise ValueError(f"model.safetensors cannot be loaded ({type(exc).__name__}: {exc})") from None
        bad = _nonfinite(state.weights) or _nonfinite(state.optimizer["state"], "optimizer state ")
        if bad is not None:
            raise ValueError(f"{bad} holds NaN or Inf values")
    return state


def find_resume_state(
    run_dir: Path, check_logs: Callable[[ResumeState], str | None]
) -> tuple[ResumeState | None, list[str]]:
    """The newest resume state that passes every check, and notes on what was skipped and why.

    ``check_logs(state)`` says why the run's logs do not match what ``state`` recorded (``None``: they do); such
    a state is skipped too, since resuming from it would build on logs that are not the ones written."""
    pointer, pointer_problem = read_pointer(run_dir)
    notes = []
    for directory in state_dirs(run_dir):
        try:
            state = read_state(directory)
            problem = check_logs(state)
            if problem is not None:
                raise ValueError(problem)
        except ValueError as exc:
            notes.append(f"skipped resume/{directory.name}: {exc}")
            continue
        if pointer_problem is not None:
            notes.append(f"{pointer_problem}; using the newest verified state, resume/{directory.name}")
        elif pointer != directory.name and dir_step(Path(pointer)) < state.step:
            notes.append(
                f"resume/{POINTER} still named {pointer}, but the newer resume/{directory.name} is complete and "
                "verified (the run stopped before the pointer moved): using it"
            )
        return state, notes
    if pointer_problem is not None and (run_dir / "resume").is_dir():
        notes.append(pointer_problem)
    return None, notes


def apply_state(state: ResumeState, model, optimizer) -> None:
    """Load a single-process state's weights, optimizer state and RNG states."""
    if state.sharded:
        raise StateError(
            f"{state.directory} holds an FSDP (sharded) resume state: resume it with distributed.strategy=fsdp"
        )
    model.load_state_dict(state.weights)
    optimizer.load_state_dict(state.optimizer)
    _set_rng_state(state.rng)
    state.weights = state.optimizer = None  # copied into the model and optimizer: free the host copies


def load_sharded(directory: Path, model, optimizer) -> dict[str, Any]:
    """Every rank: load an FSDP resume state (verified by rank 0) into the sharded model; returns ``extra``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if not (directory / "rank0.pt").is_file():
        raise StateError(f"{directory} holds a single-process state; resume it with the strategy it used")
    rank = dist.get_rank()
    local = torch.load(directory / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    if local["optim"]:
        # get_state_dict creates the missing Adam state by taking a step of lr 0 (torch's _init_optim_state); the
        # load overwrites that state, and reading the forces drops the step's (zero) record from the interval.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        optimizer.read_forces(reset=True)
    else:  # a step-0 state: the weights only
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(directory))
        set_model_state_dict(model, model_sd)
    _set_rng_state(local["rng"])
    if not all_finite(model.parameters(), distributed=True):
        raise StateError(f"{directory}: the loaded weights hold NaN or Inf values")
    return local["extra"]


def all_finite(tensors, distributed: bool = False) -> bool:
    """Whether every element of ``tensors`` is finite (FSDP shards: their local part, agreed across ranks with one
    all-reduce when ``distributed``). A host sync: call it on save steps only."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t for t in local if t.is_floating_point() and t.numel()]
    device = local[0].device if local else torch.device("cpu")
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all() if local else torch.ones((), dtype=torch.bool)
    if distributed:
        import torch.distributed as dist

        flag = ok.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return bool(ok)
