"""The training loop: reads top to bottom. ``train(cfg)`` → run directory.

Run directory (self-describing; every figure can be regenerated from it):
``config.yaml`` (resolved), ``config_changes.jsonl`` (changes accepted on resume, with their step), ``env.json``
(versions, git SHA, device of the latest launch), ``metrics.jsonl`` / ``forces.jsonl`` / ``weibull.jsonl``
(append-only, one record per log step, resume-safe), ``checkpoints/step_XXXXXX/`` (weights),
``resume/`` (the states a killed run continues from), ``.lock`` (held by the running launch).

Crash safety (``train.rundir``, ``train.checkpoint``): one launch at a time; a rerun continues from the newest
verified resume state, falls back past damaged ones with a message, and refuses rather than rewrite a run it
cannot continue; saves are durable before they are used; NaN/Inf stop the run before anything non-finite is saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.optim.schedules import warmup_cosine
from instrumented_adamw.sinks import KINDS, JsonlSink, TensorBoardSink, WandbSink
from instrumented_adamw.utils.durable_io import file_mark, write_durably
from train import checkpoint as ckpt
from train import provenance, rundir
from train.config import Config, ScheduleConfig
from train.data import build_data
from train.failpoints import fault_point
from train.models import build_model
from train.optimizers import build_optimizer, group_peaks


def lr_at(step: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) under ``cfg``: warmup, then cosine to min_lr_ratio·peak."""
    return warmup_cosine(step, peak, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio, cfg.kind)


class DeviceUnavailableError(RuntimeError):
    """``run.device`` names a device this machine does not have."""


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf; the message names the step. Nothing non-finite was saved."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a step; a resume state of that step is saved (rerun to continue)."""

    def __init__(self, signum: int, step: int, total: int, run_dir: Path) -> None:
        self.signum, self.step, self.total, self.run_dir = signum, step, total, run_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {total}; the resume state "
                         f"of step {step} is saved in {run_dir / 'resume'}")  # fmt: skip


class StopSignals:
    """SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT (Ctrl-C): the first asks the loop to
    stop after the current step and save; a second ends the process at once, as the signal would by default (a
    kill at any moment is safe: the run resumes from its newest verified state). Handlers are installed only in
    the main thread (signals reach no other) and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: now, as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"[train] {signal.Signals(signum).name}: stopping after this step and saving a resume point "
              "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``run.device`` as a device with an index where one is needed (``torch.cuda.set_device`` and DDP reject a
    bare ``cuda``): ``auto`` and ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError("run.device=mps, but this machine has no usable MPS device; use cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise DeviceUnavailableError(
            f"run.device={spec}, but no CUDA device is available (torch {torch.__version__}, built {build}); use "
            "run.device=cpu or auto"
        )
    index = int(spec.partition(":")[2]) if ":" in spec else local_rank
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"run.device={spec} (process {local_rank}): this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def _environment(device: torch.device, world: int) -> dict:
    """``env.json`` of the latest launch: versions, device, world size, threads, commit and command line."""
    described = provenance.device_description(device)
    return dict(
        provenance.versions(),
        device=str(device),
        device_name=described["device_name"],
        world_size=world,
        threads=described["threads"],  # CPU timings depend on it
        git_sha=provenance.commit_info(Path(__file__).resolve().parent)["sha"],
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


class NonFiniteWatch:
    """Non-finite losses, from the per-step losses read on log steps: counted per interval, and the current run of
    them in a row, which stops training at ``limit``. Non-finite weights stop it at once: AdamW never recovers
    from them (NaN stays NaN through the update and the decay)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.streak, self.since = limit, 0, None

    def update(self, first_step: int, losses: torch.Tensor) -> int:
        """Feed the losses of steps ``first_step, first_step + 1, ...``; returns how many were non-finite."""
        bad = (~torch.isfinite(losses)).tolist()
        for i, b in enumerate(bad):
            if b and self.streak == 0:
                self.since = first_step + i
            self.streak = self.streak + 1 if b else 0
        return sum(bad)

    def check(self, step: int, record: dict, resume_step: int | None) -> None:
        """Raise :class:`NonFiniteError` if the run must stop (``record``: the monitor's metrics of ``step``; its
        per-class RMS is non-finite exactly when some weight is)."""
        if not all(math.isfinite(v) for k, v in record.items() if k.endswith("/rms")):
            raise self.error(step, "the weights hold NaN or Inf", resume_step)
        if self.streak >= self.limit:
            what = (
                f"the loss has been NaN or Inf for {self.streak} steps in a row, since step {self.since} "
                f"(run.max_nonfinite_steps={self.limit})"
            )
            raise self.error(step, what, resume_step, loss_history=False)

    def error(self, step: int, what: str, resume_step: int | None, loss_history: bool = True) -> NonFiniteError:
        since = f"; the loss has been NaN or Inf since step {self.since}" if loss_history and self.streak else ""
        return NonFiniteError(
            f"step {step}: {what}{since}. Training stopped without saving anything non-finite; the last resume "
            f"state (step {resume_step}) is finite and kept. Lower optim.lr, set optim.grad_clip or check the "
            "data, then rerun (a changed config needs run.allow_config_change=true)."
        )

    def state_dict(self) -> dict:
        return dict(streak=self.streak, since=self.since)

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.since = int(state.get("streak", 0)), state.get("since")


def _agree(value, error: Exception | None, world: int):
    """Rank 0's decision on every rank: its value, or its error raised on every rank."""
    if world > 1:
        box = [(value, None if error is None else str(error))]
        dist.broadcast_object_list(box, src=0)
        value, message = box[0]
        if message is not None and error is None:
            raise RuntimeError(f"rank 0 did not start: {message}")
    if error is not None:
        raise error
    return value


def train(cfg: Config) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's per-shard bars would interleave with ours
    # ------------------------------------------------------------------ processes and devices
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.distributed.strategy == "none" and world > 1:
        raise RuntimeError(f"launched with {world} processes but distributed.strategy=none; set it to ddp")
    device = resolve_device(cfg.run.device, local_rank)
    if cfg.distributed.strategy in ("ddp", "fsdp") and not dist.is_initialized():
        backend = cfg.distributed.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
        world, rank = dist.get_world_size(), dist.get_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    with contextlib.ExitStack() as held:
        if rank == 0:
            held.enter_context(rundir.run_lock(run_dir))  # a second launch into this directory is refused here
        _train(cfg, run_dir, device, rank, world)
    return run_dir


def _train(cfg: Config, run_dir: Path, device: torch.device, rank: int, world: int) -> None:
    main = rank == 0
    # ------------------------------------------------------------------ continue, start fresh or refuse
    # Rank 0 decides from the verified resume states and what the directory holds; nothing is written before, and a
    # refusal comes before the data is tokenized.
    plan, error = None, None
    if main:
        try:
            plan = rundir.plan_start(cfg, run_dir)
        except rundir.RunDirError as exc:
            error = exc
    state_name = _agree(plan.state.directory.name if plan and plan.state else None, error, world)

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
    opt = build_optimizer(cfg.optim, model)  # InstrumentedAdamW, or Muon + AdamW (optim.name=muon)
    peaks = group_peaks(opt)  # before a resume state is loaded: a changed optim.lr is this config's, not the state's

    start, extra = 0, {}
    if state_name is not None:  # the decided state into the model, optimizer and RNG
        state_dir = run_dir / "resume" / state_name
        if fsdp:
            extra = ckpt.load_sharded(state_dir, model, opt)
        else:
            state = plan.state if main else ckpt.read_state(state_dir, verify=False)
            ckpt.apply_state(state, model, opt)
            extra = state.extra
        start = ckpt.dir_step(state_dir)

    # ------------------------------------------------------------------ run directory and logging (rank 0)
    end = cfg.schedule.stop_at or cfg.schedule.total_steps  # the last step of this launch (the schedule: total)
    sinks, jsonl = [], None
    if main:
        jsonl, sinks = _open_run_dir(cfg, plan, run_dir, device, world, start, end)
    if world > 1:
        dist.barrier()  # rank 0 has brought the directory to the starting point
    # Every rank has a monitor (under FSDP reading forces and fitting are collectives); only rank 0's has sinks.
    logging = cfg.logging
    schedule = cfg.schedule  # the diagnostics project T/τ along it (only its shape matters: peak 1; 0-based steps)
    shape = lambda step: lr_at(step - 1, 1.0, schedule)  # noqa: E731
    monitor = ForceMonitor(opt, model, sinks, log_every=logging.log_every, weibull_every=logging.weibull_every,
                           per_tensor=logging.per_tensor, per_tensor_every=logging.per_tensor_every,
                           total_steps=schedule.total_steps, lr_at=shape)  # fmt: skip
    monitor.load_state_dict(extra.get("monitor", {}))
    watch = NonFiniteWatch(cfg.run.max_nonfinite_steps)
    watch.load_state_dict(extra.get("nonfinite", {}))
    loop = _Loop(cfg, run_dir, device, rank, world, model, opt, peaks, data, monitor, watch, jsonl, state_name, start)
    try:
        if state_name is None:
            loop.save_initial()
        loop.run(start, end)
    finally:
        monitor.close()
    if world > 1:
        dist.barrier()


def _open_run_dir(cfg: Config, plan, run_dir: Path, device, world: int, start: int, end: int):
    """Rank 0: the directory brought to the starting point (logs cut back to the state, later outputs gone),
    ``env.json`` of this launch, what was resumed, and the sinks; returns (the JSONL sink, every sink)."""
    marks = rundir.prepare(plan, cfg, run_dir)
    write_durably(run_dir / "env.json", json.dumps(_environment(device, world), indent=1).encode())
    for note in plan.notes:
        print(f"[train] {note}", file=sys.stderr, flush=True)
    total = cfg.schedule.total_steps
    if plan.state is not None:
        done_note = ": the run is already complete" if start >= total else ""
        done_note = done_note or (f": schedule.stop_at={end} is already reached" if start >= end else "")
        print(f"[train] resumed from step {start} of {total} ({plan.state.directory}){done_note}",
              file=sys.stderr, flush=True)  # fmt: skip
    jsonl = JsonlSink(run_dir, marks=None if marks is None else {k: marks[f"{k}.jsonl"] for k in KINDS})
    sinks = [jsonl]
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
            )  # fmt: skip
        )
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_step=start + 1 if plan.state else None))
    return jsonl, sinks


class _Loop:
    """The steps of one launch, from ``start`` to ``end``, with what happens on log, fit, snapshot and save steps."""

    def __init__(self, cfg: Config, run_dir: Path, device, rank: int, world: int, model, opt, peaks: list[float], data,
                 monitor: ForceMonitor, watch: NonFiniteWatch, jsonl: JsonlSink | None, state_name: str | None,
                 start: int) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.device, self.rank, self.world = cfg, run_dir, device, rank, world
        self.main, self.fsdp = rank == 0, cfg.distributed.strategy == "fsdp"
        self.model, self.opt, self.data, self.monitor, self.watch, self.jsonl = model, opt, data, monitor, watch, jsonl
        self.peaks = peaks
        self.step_model = model
        if cfg.distributed.strategy == "ddp":
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.model.compile:
            self.step_model = torch.compile(self.step_model)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else contextlib.nullcontext  # fp32 on CPU
        )
        self.config = rundir.plain_config(cfg)
        self.kept = {"name": state_name, "step": start if state_name else None}  # the last good resume state
        self.fit_here = self.main or self.fsdp  # fits gather full tensors under FSDP: every rank takes part
        self.snapshots = checkpoint_steps(cfg)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.losses = torch.zeros(cfg.logging.log_every, device=device)  # the interval's losses, read on log steps
        self.t_last, self.steps_since = time.perf_counter(), 0
        self.progress = None

    def save_initial(self) -> None:
        """A fresh run: the initial fit (λ(t) starts here), snapshot and resume state (a kill before the first
        ``resume_every`` resumes here, not from nothing)."""
        if self.cfg.logging.weibull_every and self.fit_here:
            self.monitor.fit(0)
        save_snapshot(self.run_dir, 0, self.model, None, self.fsdp, self.main)
        self.save_state(0)

    def run(self, start: int, end: int) -> None:
        if self.main and self.cfg.logging.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=end, initial=start, desc=self.cfg.run.name, unit="step", dynamic_ncols=True)
        try:
            with StopSignals() as stop:
                for step in range(start, end):
                    lr = self.train_step(step)
                    self.after_step(step + 1, lr, end)
                    if self.progress is not None:
                        self.progress.update(1)
                    signum = self.stop_signal(step + 1, stop.signum)
                    if signum is not None and step + 1 < end:  # in the last step: the run is complete and saved
                        self.stop_now(step + 1, lr, end, signum)
        finally:
            if self.progress is not None:
                self.progress.close()

    def stop_signal(self, done: int, signum: int | None) -> int | None:
        """The signal every rank stops for after step ``done``, if any: a single process stops at once; several
        agree on log steps (each rank's signal all-reduced where the logs synchronise anyway), so no rank saves
        while another steps on."""
        if self.world == 1:
            return signum
        if done % self.cfg.logging.log_every:
            return None
        flag = torch.tensor([float(signum or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # note: a CPU-GPU sync point, on log steps only
        return int(flag.item()) or None

    def stop_now(self, done: int, lr: float, end: int, signum: int) -> None:
        """Log the steps since the last log, save the resume state of ``done`` (unless it was just saved) and
        raise :class:`Preempted`."""
        if self.steps_since:
            record = self.log_interval(done, lr, end)
            self.watch.check(done, record, self.kept["step"])
        if self.kept["step"] != done:
            moments = (v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))
            self.ensure_finite(done, lr, end, [*self.model.parameters(), *moments],
                               "the weights or Adam moments hold NaN or Inf")  # fmt: skip
            self.save_state(done)
        raise Preempted(signum, done, self.cfg.schedule.total_steps, self.run_dir)

    def train_step(self, step: int) -> float:
        """One optimizer step at the schedule's learning rate; returns that lr."""
        cfg = self.cfg
        lr = lr_at(step, cfg.optim.lr, cfg.schedule)
        for group, peak in zip(self.opt.param_groups, self.peaks, strict=True):
            group["lr"] = lr_at(step, peak, cfg.schedule)
        x, y = self.data.batch(step, self.rank, self.world)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.step_model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses[self.steps_since] = loss.detach()
        self.steps_since += 1
        fault_point("step", step + 1)
        return lr

    def after_step(self, done: int, lr: float, end: int) -> None:
        """Logs, fits, snapshots and resume states that fall on step ``done``."""
        cfg = self.cfg
        if done % cfg.logging.log_every == 0 or done == end:
            record = self.log_interval(done, lr, end)
            fault_point("log", done)
            self.watch.check(done, record, self.kept["step"])  # NaN/Inf: stop before anything is fitted or saved
        if self.fit_here and cfg.logging.weibull_every and done % cfg.logging.weibull_every == 0:
            self.monitor.fit(done)
        if done in self.snapshots:
            self.ensure_finite(done, lr, end, self.model.parameters(), "the weights hold NaN or Inf")
            optimizer = self.opt if cfg.checkpoint.save_optimizer else None
            save_snapshot(self.run_dir, done, self.model, optimizer, self.fsdp, self.main)
        if done % cfg.checkpoint.resume_every == 0 or done == end:
            moments = (v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))
            self.ensure_finite(done, lr, end, [*self.model.parameters(), *moments],
                               "the weights or Adam moments hold NaN or Inf")  # fmt: skip
            self.save_state(done)

    def save_state(self, done: int) -> None:
        """The resume state of step ``done``, with the logs' marks (its finiteness is checked by the caller)."""
        logs = {}
        if self.main:
            logs = {f"{k}.jsonl": m for k, m in self.jsonl.marks().items()}
            logs["config_changes.jsonl"] = file_mark(self.run_dir / "config_changes.jsonl")
        carry = {"monitor": self.monitor.state_dict(), "nonfinite": self.watch.state_dict()}
        kwargs = dict(config=self.config, logs=logs, extra=carry, keep=self.kept["name"])
        if self.fsdp:
            self.kept["name"] = ckpt.save_resume_sharded(self.run_dir, done, self.model, self.opt, **kwargs)
        elif self.main:
            self.kept["name"] = ckpt.save_resume(self.run_dir, done, self.model, self.opt, **kwargs)
        self.kept["step"] = done
        if self.world > 1:
            dist.barrier()

    def log_interval(self, done: int, lr: float, end: int) -> dict:
        """Write the records of the interval ending at ``done``; returns the monitor's metrics."""
        interval = self.losses[: self.steps_since]
        if self.world > 1:
            dist.all_reduce(interval)  # each rank saw its share of the batch: log the global mean
            interval /= self.world
        host = interval.double().cpu()  # note: a CPU-GPU sync point, on log steps only
        nonfinite = self.watch.update(done - self.steps_since + 1, host)
        elapsed = time.perf_counter() - self.t_last
        scalars = {"loss": float(host.mean()), "lr": lr, "nonfinite/loss_steps": nonfinite,
                   "throughput(tok/s)": self.steps_since * self.tokens_per_step / elapsed}  # fmt: skip
        if done % self.cfg.logging.eval_every == 0 or done == end:
            scalars["val_loss"] = evaluate(self.model, self.data, self.cfg, self.device, self.autocast, self.rank,
                                           self.world)  # fmt: skip
        record = self.monitor.log(done, **scalars)  # every rank: its interval restarts with rank 0's
        if self.progress is not None:
            share = record.get("Transmission/align_share", float("nan"))
            self.progress.set_postfix(
                loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['throughput(tok/s)']:.0f}", align=f"{share:.3f}"
            )
        self.t_last, self.steps_since = time.perf_counter(), 0
        return record

    def ensure_finite(self, done: int, lr: float, end: int, tensors, what: str) -> None:
        """Before a save: stop rather than write NaN/Inf, logging the interval so far so the counts are on record."""
        if ckpt.all_finite(tensors, distributed=self.fsdp):  # note: a CPU-GPU sync point, on save steps only
            return
        if self.steps_since:
            self.log_interval(done, lr, end)
        raise self.watch.error(done, what, self.kept["step"])


def summary_line(run_dir: Path) -> str:
    """Last logged loss and Transmission shares, for the end of a run."""
    from instrumented_adamw.sinks import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        return f"{run_dir}: no records"
    last = records[-1]
    val = last.get("val_loss")
    share = last.get("Transmission/align_share")
    loss = last.get("loss")
    parts = [f"step {last['step']}", f"loss {loss:.4f}" if loss is not None else "loss NaN/Inf"]
    if val is not None and math.isfinite(val):
        parts.append(f"val_loss {val:.4f}")
    if share is not None:
        parts.append(f"Transmission align share {100 * share:.1f}%")
    return ", ".join(parts)
