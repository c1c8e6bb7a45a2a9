"""Cost of live monitoring relative to training throughput, on this machine (CPU or CUDA).

Trains a GPT-NeoX (Pythia layout; sizes below) with InstrumentedAdamW tracking every step and measures, in the same
process:

* the training step (forward, backward, optimizer step with tracking; on CUDA under bf16 autocast with the fused
  kernel, and with ``--compile`` the model compiled, as the trainer runs it),
* ``ForceMonitor.log`` (one force read + aggregation per class and layer + the live diagnostics + JSONL and
  TensorBoard writes) every ``--log-every``
  steps, and separately a read that also writes the per-tensor entries, which the trainer does every
  ``--per-tensor-every`` steps,
* one ``ForceMonitor.fit`` (per-block Weibull fits of every matrix), amortised over ``--weibull-every`` steps,

and reports the monitor's share of the wall time (target ≤ 1%). Timing the pieces directly avoids comparing two
whole runs, whose difference on a shared 2-core VM is ±10% noise — far above the 1% being measured.

    python bench/monitor_overhead.py [--steps 60] [--json out.json]
    python bench/monitor_overhead.py --pythia70m --compile        (on a GPU: the reproduction runs' setting)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from common import add_model_args, add_output_args, environment, small_neox, target, write_json

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.sinks import JsonlSink, TensorBoardSink


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    add_model_args(p)
    p.add_argument("--pythia70m", action="store_true", help="Pythia-70M sizes, batch 24 x 512 (the papers' runs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as the GPU reproduction runs)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--per-tensor-every", type=int, default=250)
    p.add_argument("--weibull-every", type=int, default=250)
    p.add_argument("--no-tensorboard", action="store_true", help="JSONL only (TensorBoardSink is on by default)")
    add_output_args(p)
    args = p.parse_args()
    if args.pythia70m:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 512, 6, 50304, 24, 512
    if args.smoke:
        args.steps, args.hidden, args.layers, args.vocab, args.batch, args.seq = 10, 64, 2, 512, 2, 32
        args.log_every = 5
    return args


def time_log_pieces(opt, monitor) -> dict[str, list[float]]:
    """Where a log's time goes: the device read (read_forces: the sync, the exact norms, one copy), the aggregation
    per class and layer (the rest of ForceMonitor.read), the sinks' writes; timed inside the same calls."""
    pieces: dict[str, list[float]] = {"read_forces": [], "aggregate": [], "write": []}

    def timed(fn, piece: str, inner: str | None = None):
        """``fn`` timed into ``pieces[piece]``, less the time of the ``inner`` piece it called."""

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            pieces[piece].append(time.perf_counter() - t0 - (pieces[inner][-1] if inner else 0.0))
            return out

        return call

    opt.read_forces = timed(opt.read_forces, "read_forces")
    monitor.read = timed(monitor.read, "aggregate", inner="read_forces")
    monitor.write = timed(monitor.write, "write")
    return pieces


def measure(args, train_step, monitor, sync, pieces) -> dict[str, float]:
    """Median seconds of a training step, a log, a log with per-tensor entries and a fit."""
    for _ in range(3):
        train_step()
    monitor.log(1, loss=0.0)  # warm-up read (the interval starts clean)
    for times in pieces.values():
        times.clear()
    step_times, log_times, tensor_times = [], [], []
    for step in range(2, args.steps + 2):
        sync()
        t0 = time.perf_counter()
        train_step()
        sync()
        step_times.append(time.perf_counter() - t0)
        if step % args.log_every == 0:
            t0 = time.perf_counter()
            monitor.log(step, loss=0.0)
            (log_times if step % args.per_tensor_every else tensor_times).append(time.perf_counter() - t0)
    fit_times = []
    first = (args.steps // args.per_tensor_every + 2) * args.per_tensor_every
    for i in range(3 - min(len(tensor_times), 3)):  # reads that also write per-tensor entries, if too few were timed
        train_step()
        t0 = time.perf_counter()
        monitor.log(first + i * args.per_tensor_every, loss=0.0)
        tensor_times.append(time.perf_counter() - t0)
    for i in range(3):
        t0 = time.perf_counter()
        monitor.fit(first + 3 * args.per_tensor_every + i)
        sync()
        fit_times.append(time.perf_counter() - t0)
    tensor_log = statistics.median(tensor_times)
    log = statistics.median(log_times) if log_times else tensor_log  # per_tensor_every == log_every: every read
    return dict(step=statistics.median(step_times), log=log, tensor_log=tensor_log, fit=statistics.median(fit_times))


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = small_neox(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01, fused=True if cuda else None)
    # The sinks a dashboard user has (JSONL and TensorBoard; wandb's log call hands records to its own process) and
    # the live diagnostics projecting T/τ along a 20k-step schedule.
    logs = tempfile.mkdtemp()
    sinks = [JsonlSink(logs)]
    if not args.no_tensorboard:
        try:
            sinks.append(TensorBoardSink(f"{logs}/tensorboard"))
        except RuntimeError as exc:  # the bare GPU machine may lack tensorboard: JSONL alone, said so
            print(f"TensorBoard sink left out: {exc}")
    monitor = ForceMonitor(opt, model, sinks, log_every=args.log_every, weibull_every=0,
                           per_tensor_every=args.per_tensor_every, total_steps=20000,
                           lr_at=lambda s: min(1.0, s / 1000))  # fmt: skip
    step_model = torch.compile(model) if args.compile else model
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            logits = step_model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    pieces = time_log_pieces(opt, monitor)
    m = measure(args, train_step, monitor, sync, pieces)
    monitor.close()
    report(args, m, {name: statistics.median(times) for name, times in pieces.items() if times}, device, n_params)


def report(args, m: dict[str, float], parts: dict[str, float], device, n_params: int) -> None:
    step, log, tensor_log, fit = m["step"], m["log"], m["tensor_log"], m["fit"]
    per_step = log / args.log_every + max(tensor_log - log, 0.0) / args.per_tensor_every + fit / args.weibull_every
    env = environment(device)
    print(f"device {env['device_name']}, {n_params:,} params, batch {args.batch}x{args.seq}, compiled={args.compile}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"train step (tracking)         {step * 1e3:9.2f} ms")
    print(
        f"monitor.log every {args.log_every:<4}       {log * 1e3:9.2f} ms -> {log / args.log_every * 1e3:.3f} ms/step"
    )
    every = args.per_tensor_every
    print(f"  + per-tensor entries every {every:<4} {tensor_log * 1e3:9.2f} ms -> "
          f"{max(tensor_log - log, 0) / every * 1e3:.3f} ms/step")  # fmt: skip
    every = args.weibull_every
    print(f"monitor.fit every {every:<4}       {fit * 1e3:9.2f} ms -> {fit / every * 1e3:.3f} ms/step")
    print("  of a log (median, every read):  " + ", ".join(f"{n} {v * 1e3:.2f} ms" for n, v in parts.items()))
    print(f"monitoring overhead: {100 * per_step / step:.2f}% of training wall time (target <= 1%)")
    rows = [
        dict(piece="training step (tracking every step)", ms=step * 1e3, every=1, ms_per_step=step * 1e3),
        dict(piece="ForceMonitor.log (classes, layers)", ms=log * 1e3, every=args.log_every,
             ms_per_step=log / args.log_every * 1e3),
        dict(piece="ForceMonitor.log with per-tensor entries (extra)", ms=tensor_log * 1e3,
             every=args.per_tensor_every, ms_per_step=max(tensor_log - log, 0) / args.per_tensor_every * 1e3),
        dict(piece="ForceMonitor.fit (all matrices)", ms=fit * 1e3, every=args.weibull_every,
             ms_per_step=fit / args.weibull_every * 1e3),
        *(dict(piece=f"of a log: {name}", ms=v * 1e3, every=args.log_every, ms_per_step=v / args.log_every * 1e3)
          for name, v in parts.items()),
    ]  # fmt: skip
    targets = [target("monitoring overhead, % of training wall time", 100 * per_step / step, "<=", 1.0, "%")]
    write_json(args.json, "monitor_overhead", args, env, rows, targets, params=n_params, compiled=args.compile)


if __name__ == "__main__":
    main()
