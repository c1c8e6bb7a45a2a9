"""Checkpoints: numbered weight snapshots for analysis, and one resume state that a killed run continues from.

* ``checkpoints/step_XXXXXX/`` — ``save_pretrained`` output (``config.json`` + ``model.safetensors``), so every
  snapshot is an HF model directory (``instrumented-adamw fit`` reads it); with ``save_optimizer`` also
  ``optimizer.pt`` (the Adam moments).
* ``resume/step_XXXXXX/`` + ``resume/latest.json`` — weights, optimizer state and RNG states. The directory is
  complete before ``latest.json`` (written atomically) points at it, and older ones are deleted only after, so a
  kill at any moment leaves a loadable resume state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def save_snapshot(run_dir: Path, step: int, model, optimizer=None, state_dict=None) -> Path:
    """Weights (safetensors, HF layout) of ``step``; the optimizer moments too when ``optimizer`` is given.

    ``state_dict`` (a gathered full state dict, e.g. under FSDP) is written instead of the model's own tensors."""
    final = snapshot_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained writes the HF layout (config.json, model.safetensors, its key naming) in either case.
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def save_resume(run_dir: Path, step: int, model, optimizer, extra: dict | None = None) -> None:
    """Write the resume state of ``step``; ``extra`` (e.g. the monitor's cumulative diagnostics) rides along."""
    root = run_dir / "resume"
    target = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Tensors that share storage (tied embeddings) are saved once per name: clone to plain contiguous tensors.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    rng = dict(cpu=torch.get_rng_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(dict(optimizer=optimizer.state_dict(), rng=rng, extra=extra or {}), tmp / "state.pt")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    pointer = root / "latest.json"
    pointer_tmp = root / "latest.json.tmp"
    pointer_tmp.write_text(json.dumps(dict(step=step, dir=target.name)))
    os.replace(pointer_tmp, pointer)
    for old in root.iterdir():
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)


def latest_resume_step(run_dir: Path) -> int | None:
    pointer = run_dir / "resume" / "latest.json"
    if not pointer.is_file():
        return None
    return int(json.loads(pointer.read_text())["step"])


def load_resume(run_dir: Path, model, optimizer) -> tuple[int, dict]:
    """Restore weights, optimizer state and RNG from the latest resume state; returns its step and ``extra``."""
    info = json.loads((run_dir / "resume" / "latest.json").read_text())
    state_dir = run_dir / "resume" / info["dir"]
    weights = load_file(state_dir / "model.safetensors", device=str(next(model.parameters()).device))
    model.load_state_dict(weights)
    state = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(info["step"]), state.get("extra", {})


def save_resume_sharded(run_dir: Path, step: int, model, optimizer, extra: dict) -> None:
    """FSDP2 resume state with torch.distributed.checkpoint: every rank writes its shards; rank 0 switches the
    pointer once all have finished. Per-rank RNG and ``extra`` go into ``rank<N>.pt`` beside the shards."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    root = run_dir / "resume"
    target, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(dict(rng=dict(cpu=torch.get_rng_state()), extra=extra), tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        pointer_tmp = root / "latest.json.tmp"
        pointer_tmp.write_text(json.dumps(dict(step=step, dir=target.name, sharded=True)))
        os.replace(pointer_tmp, root / "latest.json")
        for old in root.iterdir():
            if old.is_dir() and old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_resume_sharded(run_dir: Path, model, optimizer) -> tuple[int, dict]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    info = json.loads((run_dir / "resume" / "latest.json").read_text())
    if not info.get("sharded"):
        raise RuntimeError(f"{run_dir}/resume holds a single-process state; resume it with the strategy it used")
    state_dir = run_dir / "resume" / info["dir"]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(state_dir))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    local = torch.load(state_dir / f"rank{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(local["rng"]["cpu"])
    return int(info["step"]), local["extra"]
