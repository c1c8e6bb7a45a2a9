"""The training loop: reads top to bottom. ``train(cfg)`` → run directory.

Run directory (self-describing; every figure can be regenerated from it):
``config.yaml`` (resolved), ``env.json`` (versions, git SHA, device), ``metrics.jsonl`` / ``forces.jsonl`` /
``weibull.jsonl`` (append-only, one record per log step, resume-safe), ``checkpoints/step_XXXXXX/`` (weights),
``resume/`` (the state a killed run continues from).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.sinks import JsonlSink, TensorBoardSink, WandbSink

from . import checkpoint as ckpt
from .config import Config, dump_config
from .data import build_data
from .models import build_model
from .schedule import lr_at


def _device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _environment(device: torch.device, world: int) -> dict:
    import transformers

    return dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        transformers=transformers.__version__,
        platform=platform.platform(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        world_size=world,
        git_sha=_git_sha(),
        argv=sys.argv,
    )


def shard_model(model) -> None:
    """FSDP2: shard every transformer block (the model's ``_no_split_modules``), then the root."""
    from torch.distributed.fsdp import fully_shard

    block_types = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise RuntimeError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def save_snapshot(run_dir: Path, step: int, model, optimizer, fsdp: bool, main: bool) -> None:
    """Numbered weight snapshot; under FSDP every rank helps gather the full state dict and rank 0 writes it."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if main:
            ckpt.save_snapshot(run_dir, step, model, None, state_dict=full)
    elif main:
        ckpt.save_snapshot(run_dir, step, model, optimizer)


def checkpoint_steps(cfg: Config) -> set[int]:
    """Numbered snapshots: step 0 (init), the log-spaced early steps, every ``checkpoint.every``, the last."""
    total = cfg.schedule.total_steps
    steps = {0, total} | {s for s in cfg.checkpoint.early if s < total}
    steps |= set(range(cfg.checkpoint.every, total, cfg.checkpoint.every))
    return steps


@torch.no_grad()
def evaluate(model, data, cfg: Config, device, autocast, rank: int, world: int) -> float:
    """Mean token cross-entropy over the fixed validation batches (summed across ranks)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in data.valid_batches(cfg.logging.eval_batches, rank, world):
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += torch.stack((loss.double(), torch.tensor(float(y.numel()), device=device, dtype=torch.float64)))
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])  # note: a CPU-GPU sync point, on eval steps only


def train(cfg: Config) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's per-shard bars would interleave with ours
    # ------------------------------------------------------------------ processes and devices
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.distributed.strategy == "none" and world > 1:
        raise RuntimeError(f"launched with {world} processes but distributed.strategy=none; set it to ddp")
    device = _device(cfg.run.device, local_rank)
    if cfg.distributed.strategy in ("ddp", "fsdp") and not dist.is_initialized():
        backend = cfg.distributed.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
        world, rank = dist.get_world_size(), dist.get_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0
    run_dir = Path(cfg.run.out_dir) / cfg.run.name

    # ------------------------------------------------------------------ data (rank 0 tokenizes first)
    if main:
        data = build_data(cfg.data, cfg.run.seed)
    if world > 1:
        dist.barrier()
    if not main:
        data = build_data(cfg.data, cfg.run.seed)

    # ------------------------------------------------------------------ model and optimizer
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)
    if model.config.vocab_size <= int(max(data.train.max(), data.valid.max())):
        raise ValueError(f"model.vocab_size={model.config.vocab_size} is too small for the token ids of the data")
    fsdp = cfg.distributed.strategy == "fsdp"
    if fsdp:
        shard_model(model)  # before the optimizer: it must see the DTensor shards
    opt = InstrumentedAdamW(
        model.named_parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,  # on every parameter, as in the papers' recipe
        fused=cfg.optim.fused,
        track_every=cfg.optim.track_every,
        weight_decay_schedule=cfg.optim.weight_decay_schedule,
    )
    for group in opt.param_groups:
        group["initial_lr"] = cfg.optim.lr  # the peak: lr_squared decay scales by lr_t / peak

    start, resumed = 0, {}
    if cfg.run.resume and ckpt.latest_resume_step(run_dir) is not None:
        load = ckpt.load_resume_sharded if fsdp else ckpt.load_resume
        start, resumed = load(run_dir, model, opt)
    step_model = model
    if cfg.distributed.strategy == "ddp":
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.model.compile:
        step_model = torch.compile(step_model)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext  # fp32 on CPU
    )

    # ------------------------------------------------------------------ run directory and logging (rank 0)
    # Every rank has a monitor (under FSDP reading forces and fitting are collectives); only rank 0's has sinks.
    sinks = []
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "env.json").write_text(json.dumps(_environment(device, world), indent=1))
        sinks = [JsonlSink(run_dir, resume_step=start)]  # drops records written after the resume point
        if cfg.logging.wandb:
            sinks.append(
                WandbSink(
                    cfg.logging.wandb_project,
                    config=cfg.to_dict(),
                    directory=run_dir,
                    name=cfg.run.name,
                    mode=cfg.logging.wandb_mode,
                    run_id=f"{cfg.run.name}-{cfg.run.seed}",
                    table_every=cfg.logging.weibull_every or cfg.logging.eval_every,
                )
            )
        if cfg.logging.tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_step=start + 1 if start else None))
    monitor = ForceMonitor(
        opt,
        model,
        sinks,
        log_every=cfg.logging.log_every,
        weibull_every=cfg.logging.weibull_every,
        per_tensor=cfg.logging.per_tensor,
    )
    monitor.load_state_dict(resumed.get("monitor", {}))
    fit_here = main or fsdp  # fits gather full tensors under FSDP: every rank takes part
    if start == 0:
        if cfg.logging.weibull_every and fit_here:
            monitor.fit(0)  # the initial distribution: λ(t) starts here
        save_snapshot(run_dir, 0, model, None, fsdp, main)
    snapshots = checkpoint_steps(cfg)

    # ------------------------------------------------------------------ loop
    total = cfg.schedule.total_steps
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    progress = None
    if main and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc=cfg.run.name, unit="step", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    t_last, steps_since = time.perf_counter(), 0
    for step in range(start, total):
        lr = lr_at(step, cfg.optim.lr, cfg.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.batch(step, rank, world)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = step_model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        steps_since += 1
        done = step + 1

        if done % cfg.logging.log_every == 0 or done == total:
            if world > 1:
                dist.all_reduce(loss_sum)  # each rank saw its share of the batch: log the global mean
                loss_sum /= world
            mean_loss = float(loss_sum) / steps_since  # note: a CPU-GPU sync point, on log steps only
            elapsed = time.perf_counter() - t_last
            scalars = {"loss": mean_loss, "lr": lr, "throughput(tok/s)": steps_since * tokens_per_step / elapsed}
            if done % cfg.logging.eval_every == 0 or done == total:
                scalars["val_loss"] = evaluate(model, data, cfg, device, autocast, rank, world)
            record = monitor.log(done, **scalars)  # every rank: its interval restarts with rank 0's
            if progress is not None:
                share = record.get("Transmission/align_share", float("nan"))
                progress.set_postfix(
                    loss=f"{mean_loss:.3f}", tok_s=f"{scalars['throughput(tok/s)']:.0f}", align=f"{share:.3f}"
                )
            loss_sum.zero_()
            t_last, steps_since = time.perf_counter(), 0
        if fit_here and cfg.logging.weibull_every and done % cfg.logging.weibull_every == 0:
            monitor.fit(done)
        if done in snapshots:
            save_snapshot(run_dir, done, model, opt if cfg.checkpoint.save_optimizer else None, fsdp, main)
        if done % cfg.checkpoint.resume_every == 0 or done == total:
            extra = {"monitor": monitor.state_dict()}
            if fsdp:
                ckpt.save_resume_sharded(run_dir, done, model, opt, extra)
            elif main:
                ckpt.save_resume(run_dir, done, model, opt, extra=extra)
            if world > 1:
                dist.barrier()
        if progress is not None:
            progress.update(1)

    if progress is not None:
        progress.close()
    monitor.close()
    if world > 1:
        dist.barrier()
    return run_dir


def summary_line(run_dir: Path) -> str:
    """Last logged loss and Transmission shares, for the end of a run."""
    from instrumented_adamw.sinks import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        return f"{run_dir}: no records"
    last = records[-1]
    val = last.get("val_loss")
    share = last.get("Transmission/align_share")
    parts = [f"step {last['step']}", f"loss {last['loss']:.4f}"]
    if val is not None and math.isfinite(val):
        parts.append(f"val_loss {val:.4f}")
    if share is not None:
        parts.append(f"Transmission align share {100 * share:.1f}%")
    return ", ".join(parts)
