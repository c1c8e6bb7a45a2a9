"""CPU step time: InstrumentedAdamW (tracking every step) vs torch.optim.AdamW, Pythia-70M-shaped parameters.

Both optimizers run in this process on identical parameter sets with fixed gradients; each timing is the median of
``--repeats`` steps after ``--warmup`` steps. The ratio is against torch's foreach AdamW (the issue's baseline); the
single-tensor and fused CPU variants are printed too.

    python bench/optimizer_step_cpu.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from common import make_params

from instrumented_adamw import InstrumentedAdamW


def time_steps(opt: torch.optim.Optimizer, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    n = sum(p.numel() for p in make_params())
    rows = {}
    variants = [
        ("torch AdamW foreach (baseline)", torch.optim.AdamW, {"foreach": True}),
        ("InstrumentedAdamW foreach", InstrumentedAdamW, {"foreach": True}),
        ("torch AdamW single-tensor", torch.optim.AdamW, {"foreach": False}),
        ("InstrumentedAdamW single-tensor", InstrumentedAdamW, {"foreach": False}),
        ("torch AdamW fused", torch.optim.AdamW, {"fused": True}),
        ("InstrumentedAdamW fused", InstrumentedAdamW, {"fused": True}),
    ]
    for label, cls, kw in variants:
        opt = cls(make_params(), lr=1e-3, weight_decay=0.01, **kw)
        rows[label] = time_steps(opt, args.warmup, args.repeats)
        del opt
    base = rows["torch AdamW foreach (baseline)"]
    print(f"{n:,} fp32 params, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    for label, t in rows.items():
        print(f"{label:34s} {1e3 * t:8.1f} ms   {t / base:5.2f}x foreach baseline")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n, "torch": torch.__version__, "ms": {k: 1e3 * v for k, v in rows.items()}}, f)


if __name__ == "__main__":
    main()
