"""Accuracy and speed of inner-product strategies on one embedding-sized fp32 tensor (CPU).

Backs the choice in ``instrumented_adamw/kernels/reductions.py``: for each strategy, the median time of 5 calls and the
relative error against a float64 dot product of the same data.

    python bench/reductions_cpu.py [--numel 25755648]     # one Pythia-70M embedding
    python bench/reductions_cpu.py --numel 1048576        # one 512 x 2048 hidden matrix
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instrumented_adamw.kernels import cpu_adamw
from instrumented_adamw.kernels.reductions import ROW, dot_f64, sq_f64


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
        "dot_f64 (fp32 rows, float64 across)": lambda: dot_f64(w, u),
        "row-blocked bmm (dot_f64 beyond ROWS_MAX)": lambda: torch.bmm(
            w[: w.numel() // ROW * ROW].view(-1, 1, ROW), u[: u.numel() // ROW * ROW].view(-1, ROW, 1)
        ).sum(dtype=torch.float64),
        "reference: torch.mul into reused buffer": lambda: torch.mul(w, u, out=out).sum(),
    }
    sq_exact = torch.dot(w.double(), w.double()).item()
    squares = {"sq_f64 (per-row vector_norm)": lambda: sq_f64(w), "dot_f64(w, w)": lambda: dot_f64(w, w)}
    print(f"{args.numel:,} fp32 elements, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in strategies.items():
        t, v = timed(fn)
        print(f"{name:42s} {1e3 * t:8.1f} ms   rel. error {abs(v - exact) / abs(exact):.1e}")
    for name, fn in squares.items():
        t, v = timed(fn)
        print(f"{name:42s} {1e3 * t:8.1f} ms   rel. error {abs(v - sq_exact) / abs(sq_exact):.1e}  (‖w‖²)")
    # All three reductions of reduce3 (⟨w,u⟩, ‖u‖², ‖w‖²): the C library's one read against the torch ops.
    lib = cpu_adamw.library()
    triple = torch.empty(3, dtype=torch.float64)
    u_exact = torch.dot(u.double(), u.double()).item()
    exact3 = torch.tensor([exact, u_exact, sq_exact], dtype=torch.float64)
    threes = {
        "reduce3, torch ops (dot_f64 + 2 sq_f64)": lambda: torch.stack((dot_f64(w, u), sq_f64(u), sq_f64(w))),
    }
    if lib is not None:
        threes["reduce3, C library (one read)"] = lambda: lib.reduce3(w, u, triple) or triple
    else:
        print(f"C library not available: {cpu_adamw.status().reason}")
    for name, fn in threes.items():
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t0)
        err = ((value - exact3).abs() / exact3.abs()).max().item()
        print(f"{name:42s} {1e3 * statistics.median(times):8.1f} ms   rel. error {err:.1e}  (all three, worst)")


if __name__ == "__main__":
    main()
