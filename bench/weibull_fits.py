"""Per-block Weibull fits of every Pythia-70M weight matrix: ours (torch) against a plain numpy float64 fit.

The model is randomly initialised from the Pythia-70M config (no download). The baseline is the obvious numpy
implementation of the same protocol: float64 copy, full ``np.sort``, Hazen mask, ``np.polyfit``. On CUDA the script
also times our fits on the GPU (synchronised wall clock, median of repeats).

    python bench/weibull_fits.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
import transformers

from instrumented_adamw.weibull import HAZEN_CACHE, fit_weibull

#: Pythia-70M (EleutherAI/pythia-70m config.json; also ../shared/reference/paper_numbers.md).
PYTHIA_70M = dict(
    vocab_size=50304,
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    initializer_range=0.02,
)


def numpy_fit(w: np.ndarray, trim: float = 0.1) -> tuple[float, float]:
    a = np.sort(np.abs(w.astype(np.float64)).ravel())
    a = a[a > 0]
    f = (np.arange(1, a.size + 1) - 0.5) / a.size
    keep = (f >= trim) & (f <= 1 - trim)
    k, b = np.polyfit(np.log(a[keep]), np.log(-np.log1p(-f[keep])), 1)
    return k, float(np.exp(-b / k))


def timed(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**PYTHIA_70M))
    mats = [p.detach() for p in model.parameters() if p.ndim == 2]
    n_el = sum(m.numel() for m in mats)
    print(
        f"{len(mats)} matrices, {n_el:,} elements; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )

    # Same numbers first: the speed comparison is between two implementations of one protocol.
    worst = max(abs(fit_weibull(m).k - numpy_fit(m.numpy())[0]) for m in mats)
    print(f"max |k_ours - k_numpy| = {worst:.1e}")

    def ours(ms=mats):
        for m in ms:
            fit_weibull(m)

    def cold():
        HAZEN_CACHE.clear()
        ours()

    t_np = timed(lambda: [numpy_fit(m.numpy()) for m in mats], args.repeats)
    t_cold = timed(cold, args.repeats)
    t_warm = timed(ours, args.repeats)
    print(f"{'variant':<40} {'s':>8} {'x numpy':>8}")
    print(f"{'numpy float64 sort + polyfit (baseline)':<40} {t_np:>8.3f} {1.0:>8.2f}")
    print(f"{'fit_weibull CPU, empty y cache':<40} {t_cold:>8.3f} {t_np / t_cold:>8.2f}")
    print(f"{'fit_weibull CPU, y cache warm (refit)':<40} {t_warm:>8.3f} {t_np / t_warm:>8.2f}")
    if torch.cuda.is_available():
        gpu = [m.cuda() for m in mats]
        ours(gpu)  # warm-up: kernels, allocator, y cache
        t_gpu = timed(lambda: ours(gpu), max(args.repeats, 10), torch.cuda.synchronize)
        print(f"{'fit_weibull ' + torch.cuda.get_device_name():<40} {t_gpu * 1e3:>7.1f}ms {t_np / t_gpu:>8.1f}")


if __name__ == "__main__":
    main()
