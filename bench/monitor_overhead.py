"""Cost of live monitoring relative to training throughput, on this machine (CPU or CUDA).

Trains a small GPT-NeoX (Pythia layout; sizes below) with InstrumentedAdamW tracking every step and measures, in
the same process:

* the training step (forward, backward, optimizer step with tracking),
* ``ForceMonitor.log`` (one force read + aggregation per class/layer/tensor + JSONL write), every ``--log-every``
  steps,
* one ``ForceMonitor.fit`` (per-block Weibull fits of every matrix), amortised over ``--weibull-every`` steps,

and reports the monitor's share of the wall time. Timing the pieces directly avoids comparing two whole runs,
whose difference on a shared 2-core VM is ±10% noise — far above the 1% being measured.

    python bench/monitor_overhead.py [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from common import add_model_args, small_neox

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.sinks import JsonlSink


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    add_model_args(p)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--weibull-every", type=int, default=250)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = small_neox(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    tmp = tempfile.mkdtemp()
    monitor = ForceMonitor(opt, model, [JsonlSink(tmp)], log_every=args.log_every, weibull_every=0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    def train_step():
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        train_step()
    step_times, log_times = [], []
    for step in range(1, args.steps + 1):
        sync()
        t0 = time.perf_counter()
        train_step()
        sync()
        step_times.append(time.perf_counter() - t0)
        if step % args.log_every == 0:
            t0 = time.perf_counter()
            monitor.log(step, loss=0.0)
            log_times.append(time.perf_counter() - t0)
    fit_times = []
    for i in range(3):
        t0 = time.perf_counter()
        monitor.fit(args.steps + i)
        fit_times.append(time.perf_counter() - t0)
    step = statistics.median(step_times)
    log = statistics.median(log_times)
    fit = statistics.median(fit_times)
    per_step = log / args.log_every + fit / args.weibull_every
    print(f"device {device}, {n_params:,} params, batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads")
    print(f"train step (tracking)   {step * 1e3:9.2f} ms")
    print(f"monitor.log every {args.log_every:<4} {log * 1e3:9.2f} ms -> {log / args.log_every * 1e3:.3f} ms/step")
    every = args.weibull_every
    print(f"monitor.fit every {every:<4} {fit * 1e3:9.2f} ms -> {fit / every * 1e3:.3f} ms/step")
    print(f"monitoring overhead: {100 * per_step / step:.2f}% of training wall time (target <= 1%)")


if __name__ == "__main__":
    main()
