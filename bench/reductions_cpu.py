"""Accuracy and speed of inner-product strategies on one embedding-sized fp32 tensor (CPU).

Backs the choice in ``instrumented_adamw/reductions.py``: for each strategy, the median time of 5 calls and the
relative error against a float64 dot product of the same data.

    python bench/reductions_cpu.py [--numel 25755648]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instrumented_adamw.reductions import dot_f64


def timed(fn, repeats=5):
    fn()
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=50304 * 512, help="default: one Pythia-70M embedding")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(args.numel, generator=g)
    u = 0.5 * torch.randn(args.numel, generator=g) + 10 * w  # correlated, as W and û are in training
    exact = torch.dot(w.double(), u.double()).item()
    out = torch.empty_like(w)
    strategies = {
        "torch.dot fp32": lambda: torch.dot(w, u),
        "(w*u).sum() fp32": lambda: (w * u).sum(),
        "(w*u).sum(dtype=float64)": lambda: (w * u).sum(dtype=torch.float64),
        "dot_f64 (row-blocked bmm)": lambda: dot_f64(w, u),
        "reference: torch.mul into reused buffer": lambda: torch.mul(w, u, out=out).sum(),
    }
    print(f"{args.numel:,} fp32 elements, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in strategies.items():
        t, v = timed(fn)
        print(f"{name:42s} {1e3 * t:8.1f} ms   rel. error {abs(v - exact) / abs(exact):.1e}")


if __name__ == "__main__":
    main()
