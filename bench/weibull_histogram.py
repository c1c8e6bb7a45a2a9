"""How the histogram variant of the Weibull fit moves, against the exact fit: the figures in docs/weibull.md.

1. Scale sweep: one fixed N(0, 1) draw (512×2048) times σ, for 64 values of σ spanning one bin width
   (10^(14/1024) ≈ ×1.032) from 0.02. The exact fit is scale-invariant; the whole-bin rule is not, because the
   bin edges slide across the trim bounds. Prints the peak-to-peak range of k for each reading.
2. Mean subtraction: N(0, 0.02²) 512×2048, 64 draws; |k(center=True) − k(center=False)|, exact and whole-bin.
3. Parity with npm-weibull-py 0.4.0 (a dev dependency) on the tensors of tests/test_weibull_parity.py.

    python bench/weibull_histogram.py        # ~15 s on 2 CPU cores
"""

from __future__ import annotations

import numpy as np
import torch

from instrumented_adamw.weibull.fit import HIST_BINS, HIST_LOG10_RANGE, fit_weibull, fit_weibull_histogram

SHAPE = (512, 2048)


def scale_sweep(points: int = 64) -> None:
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    bin_width = (HIST_LOG10_RANGE[1] - HIST_LOG10_RANGE[0]) / HIST_BINS
    ks: dict[str, list[float]] = {"exact": [], "midpoint": [], "fractional": []}
    for e in np.linspace(0.0, bin_width, points):
        w = (0.02 * 10**e) * z
        ks["exact"].append(fit_weibull(w).k)
        for edge in ("midpoint", "fractional"):
            ks[edge].append(fit_weibull_histogram(w, edge=edge).k)
    exact = np.array(ks["exact"])
    print(f"scale sweep, {points} σ over one bin width from 0.02, N(0, σ²) {SHAPE[0]}×{SHAPE[1]}, one draw:")
    for name, values in ks.items():
        v = np.array(values)
        print(
            f"  {name:>10}: k peak-to-peak {np.ptp(v):.2e}, largest step between neighbours "
            f"{np.abs(np.diff(v)).max():.2e}; k − k_exact in [{(v - exact).min():+.2e}, {(v - exact).max():+.2e}]"
        )


def centering(seeds: int = 64) -> None:
    diffs = []
    for seed in range(seeds):
        w = 0.02 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        diffs.append(
            (
                fit_weibull(w, center=True).k - fit_weibull(w).k,
                fit_weibull_histogram(w).k - fit_weibull_histogram(w, center=False).k,
            )
        )
    a = np.abs(np.array(diffs))
    print(f"mean subtraction, N(0, 0.02²) {SHAPE[0]}×{SHAPE[1]}, {seeds} draws: |k(center=True) − k(center=False)|")
    for i, name in enumerate(("exact", "midpoint")):
        print(f"  {name:>10}: median {np.median(a[:, i]):.1e}, max {a[:, i].max():.1e}")


def parity() -> None:
    import npm_weibull

    rng = np.random.default_rng(20)

    def signed_weibull(k, lam, shape):
        return (rng.choice([-1.0, 1.0], size=shape) * lam * rng.weibull(k, size=shape)).astype(np.float32)

    tensors = {
        "normal": torch.from_numpy((0.02 * rng.standard_normal(SHAPE)).astype(np.float32)),
        "weibull k=1.1": torch.from_numpy(signed_weibull(1.1, 0.03, (512, 1024))),
        "weibull k=1.4": torch.from_numpy(signed_weibull(1.4, 0.01, (512, 1024))),
        "bf16 normal": torch.from_numpy((0.02 * rng.standard_normal((512, 1024))).astype(np.float32)).bfloat16(),
        "student-t df=3": torch.from_numpy((0.02 * rng.standard_t(3.0, (512, 1024))).astype(np.float32)),
    }
    print(f"parity with npm-weibull-py {npm_weibull.__version__} (ours − library), whole-bin rule:")
    for name, w in tensors.items():
        for trim, label in ((0.1, "mid_80"), (0.05, "mid_90"), (0.0, "full_range")):
            for center in (False, True):
                x = w.double() - w.double().mean() if center else w
                lib = npm_weibull.weibull_fit(npm_weibull.extract_to_histogram(x), trim=label)
                ours = fit_weibull_histogram(w, trim=trim, center=center)
                print(
                    f"  {name:>15} {label:>10} center={center!s:<5}: Δk {ours.k - lib['k']:+.1e}  "
                    f"Δλ/λ {ours.lam / lib['lambda'] - 1:+.1e}"
                )


if __name__ == "__main__":
    torch.set_num_threads(2)
    scale_sweep()
    centering()
    parity()
