"""Host time of one fused optimizer step: the Python and launches around the kernels, which a small model's step
cannot hide behind the GPU's work.

    python bench/host_overhead.py [--shapes pythia-70m,pythia-410m] [--rounds 30] [--json out.json]

On a GPU (no stubs): wall time of ``step()`` with the device drained before each call, so the figure is what the
host spends enqueuing (launches are asynchronous) — torch fused AdamW against InstrumentedAdamW fused with tracking
every step. On CPU the same CUDA code path runs with its kernels stubbed out — our two Triton launches and torch's
``torch._fused_adamw_`` — on CPU tensors, so both sides measure their Python and small ops alone; the figures
predict the GPU's host time without a GPU (a CPU's own fused step is not this path). Warm-up, then the variants
interleaved round by round; medians. On an H200, Pythia-70M's torch fused step takes 0.87 ms of GPU time
(``bench/optimizer_step.py``): host time above that is what shows.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import SMOKE, add_output_args, environment, hardware, make_params, write_json

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.kernels import triton_adamw

VARIANTS = [("torch AdamW fused", torch.optim.AdamW), ("InstrumentedAdamW fused", InstrumentedAdamW)]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_kernels():
    """Our Triton launches and torch's fused AdamW kernel as no-ops, and the Triton path enabled on CPU."""
    saved = (triton_adamw._adamw_block, triton_adamw._sum_partials, torch._fused_adamw_)
    device_check = InstrumentedAdamW.__dict__["_triton_device"]
    triton_adamw._adamw_block = triton_adamw._sum_partials = _NoLaunch()
    torch._fused_adamw_ = lambda *args, **kwargs: None
    InstrumentedAdamW._triton_device = staticmethod(lambda device: True)
    try:
        yield
    finally:
        triton_adamw._adamw_block, triton_adamw._sum_partials, torch._fused_adamw_ = saved
        InstrumentedAdamW._triton_device = device_check


def host_ms(opt: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="pythia-70m,pythia-410m")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant, interleaved")
    parser.add_argument("--warmup", type=int, default=10)
    add_output_args(parser)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = list(SMOKE) if args.smoke else args.shapes.split(",")
    rounds, warmup = (3, 1) if args.smoke else (args.rounds, args.warmup)
    rows: list[dict] = []
    with contextlib.nullcontext() if device == "cuda" else stubbed_kernels():
        for name in shapes:
            opts = {}
            for label, cls in VARIANTS:
                params = make_params(name, seed=0, device=device)
                for p in params:
                    p.grad = torch.zeros_like(p)
                opts[label] = cls(params, lr=1e-3, weight_decay=0.01, fused=True)
            times: dict[str, list[float]] = {label: [] for label in opts}
            for _ in range(warmup):
                for opt in opts.values():
                    opt.step()
            for _ in range(rounds):
                for label, opt in opts.items():
                    times[label].append(host_ms(opt, device))
            base = statistics.median(times["torch AdamW fused"])
            for label, ts in times.items():
                ms = statistics.median(ts)
                rows.append(dict(shape=name, tensors=len(params), variant=label, host_ms=ms, x_torch=ms / base))
                print(f"{name:12s} {len(params):4d} tensors  {label:26s} host {ms:7.3f} ms  ({ms / base:5.2f}x torch)")
    print(f"device: {hardware(device)}" + ("" if device == "cuda" else " (kernels stubbed: host time alone)"))
    write_json(args.json, "host_overhead", args, environment(device), rows, [], stubbed=device != "cuda")


if __name__ == "__main__":
    main()
