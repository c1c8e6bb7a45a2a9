"""Per-block Weibull fits of every Pythia-70M weight matrix: ours (torch) against a plain numpy float64 fit.

The model is randomly initialised from the Pythia-70M config (no download). The baseline is the obvious numpy
implementation of the same protocol: float64 copy, full ``np.sort``, Hazen mask, ``np.polyfit``. On CUDA the script
also times our fits on the GPU (synchronised wall clock, median of repeats; target ≤ 30 ms for all 26 matrices).

    python bench/weibull_fits.py [--repeats 3] [--gpu-repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import transformers
from common import add_output_args, environment, target, write_json

from instrumented_adamw.weibull.fit import HAZEN_CACHE, fit_weibull

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
#: The same layout at toy size (``--smoke``).
SMOKE = dict(PYTHIA_70M, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=256)  # fmt: skip
GPU_TARGET_MS = 30.0


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
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the CPU timings (numpy and ours)")
    parser.add_argument("--gpu-repeats", type=int, default=10)
    add_output_args(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**(SMOKE if args.smoke else PYTHIA_70M)))
    mats = [p.detach() for p in model.parameters() if p.ndim == 2]
    n_el = sum(m.numel() for m in mats)
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{len(mats)} matrices, {n_el:,} elements; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{env['cpu']}")  # fmt: skip

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
    rows = [
        dict(variant="numpy float64 sort + polyfit (baseline)", device="cpu", s=t_np, x_numpy=1.0),
        dict(variant="fit_weibull, empty Hazen-y cache", device="cpu", s=t_cold, x_numpy=t_np / t_cold),
        dict(variant="fit_weibull, y cache warm (a monitor's refit)", device="cpu", s=t_warm, x_numpy=t_np / t_warm),
    ]
    print(f"{'variant':<46} {'s':>8} {'x numpy':>8}")
    for r in rows:
        print(f"{r['variant']:<46} {r['s']:>8.3f} {r['x_numpy']:>8.2f}")
    targets = [target("CPU: fit_weibull (warm) / numpy speed-up", t_np / t_warm, ">=", 5.0, "x")]
    if torch.cuda.is_available():
        gpu = [m.cuda() for m in mats]
        ours(gpu)  # warm-up: kernels, allocator, y cache
        t_gpu = timed(lambda: ours(gpu), max(args.gpu_repeats, 1), torch.cuda.synchronize)
        rows.append(dict(variant=f"fit_weibull on {env['device_name']}", device="cuda", s=t_gpu, x_numpy=t_np / t_gpu))
        print(f"{'fit_weibull ' + env['device_name']:<46} {t_gpu * 1e3:>7.1f}ms {t_np / t_gpu:>8.1f}")
        targets.append(target(f"GPU: per-block fits of all {len(mats)} matrices", t_gpu * 1e3, "<=", GPU_TARGET_MS,
                              "ms"))  # fmt: skip
    write_json(args.json, "weibull_fits", args, env, rows, targets, matrices=len(mats), elements=n_el,
               max_abs_k_difference=worst)  # fmt: skip


if __name__ == "__main__":
    main()
