"""GPU optimizer step at the memory floor: InstrumentedAdamW (fused Triton kernel, tracking every step) vs torch.

    python bench/optimizer_step.py [--repeats 50]        (needs CUDA)

In one process on one GPU: the measured device-to-device copy bandwidth and the 28 B/param fp32 AdamW floor
(read p, g, m, v; write p, m, v); then torch fused AdamW (untracked), torch foreach AdamW, and InstrumentedAdamW
fused with tracking every step, for Pythia-70M, -410M and -1.4B parameter sets. CUDA events, warm-up, medians;
several parameter sets in rotation so that the L2 cache does not serve repeated steps. Reports ms, GB/s at 28
B/param and % of copy bandwidth; the target is InstrumentedAdamW ≤ 1.0× torch fused.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import PYTHIA, cuda_median_ms, make_params, pythia_shapes

from instrumented_adamw import InstrumentedAdamW

BYTES_PER_PARAM = 28  # fp32: read p, g, m, v (16) + write p, m, v (12)


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (cuda_median_ms(lambda: dst.copy_(src), repeats) / 1e3)


def step_ms(cls, kw: dict, name: str, sets: int, repeats: int) -> float:
    opts = [cls(make_params(name, seed=i, device="cuda"), lr=1e-3, weight_decay=0.01, **kw) for i in range(sets)]
    turn = [0]

    def step():
        opts[turn[0] % sets].step()
        turn[0] += 1

    return cuda_median_ms(step, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--sets", type=int, default=3, help="parameter sets in rotation (defeats the L2 cache)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/optimizer_step.py needs a CUDA device (CPU: bench/optimizer_step_cpu.py)")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; torch {torch.__version__}")
    variants = [
        ("torch AdamW fused", torch.optim.AdamW, {"fused": True}),
        ("torch AdamW foreach", torch.optim.AdamW, {"foreach": True}),
        ("InstrumentedAdamW fused (tracking)", InstrumentedAdamW, {"fused": True}),
    ]
    for name in PYTHIA:
        n = sum(math.prod(shape) for shape in pythia_shapes(name))
        floor = n * BYTES_PER_PARAM / bw * 1e3
        print(f"\n{name}: {n:,} params, floor {floor:.3f} ms at {BYTES_PER_PARAM} B/param")
        base = None
        for label, cls, kw in variants:
            ms = step_ms(cls, kw, name, args.sets, args.repeats)
            base = base or ms
            gbs = n * BYTES_PER_PARAM / (ms / 1e3) / 1e9
            print(
                f"  {label:36s} {ms:8.3f} ms {gbs:7.0f} GB/s {100 * gbs * 1e9 / bw:5.1f}% copy  {ms / base:5.2f}x fused"
            )


if __name__ == "__main__":
    main()
