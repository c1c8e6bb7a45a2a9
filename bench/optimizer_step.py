"""GPU optimizer step at the memory floor: InstrumentedAdamW (fused Triton kernel, tracking every step) vs torch.

    python bench/optimizer_step.py [--repeats 50] [--json out.json]        (needs CUDA; --smoke runs anywhere)

In one process on one GPU: the measured device-to-device copy bandwidth and the 28 B/param fp32 AdamW floor
(read p, g, m, v; write p, m, v); then torch fused AdamW (untracked), torch foreach AdamW, and InstrumentedAdamW
fused with tracking every step, for Pythia-70M, -410M and -1.4B parameter sets. CUDA events, warm-up, medians.
Parameter sets rotate only where one set's working set (16 B/param read) is small enough for the L2 cache to serve
repeated steps (under 8× L2); every Pythia set is far larger than an H100's 50 MB L2, so each uses one set and the
1.4B one fits in memory with torch's foreach temporaries. Reports ms, GB/s at 28 B/param and % of copy bandwidth;
the targets are InstrumentedAdamW ≤ 1.0× torch fused and ≥ 85% of copy bandwidth.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import (
    PYTHIA,
    SMOKE,
    add_output_args,
    environment,
    make_params,
    median_ms,
    pythia_shapes,
    target,
    write_json,
)

from instrumented_adamw import InstrumentedAdamW

BYTES_PER_PARAM = 28  # fp32: read p, g, m, v (16) + write p, m, v (12)
#: Rotate parameter sets until their working sets exceed this many L2 caches (repeated steps must miss L2).
L2_MULTIPLE = 8
VARIANTS = [
    ("torch AdamW fused", torch.optim.AdamW, {"fused": True}),
    ("torch AdamW foreach", torch.optim.AdamW, {"foreach": True}),
    ("InstrumentedAdamW fused (tracking)", InstrumentedAdamW, {"fused": True}),
]


def copy_bandwidth(nbytes: int, repeats: int, device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), repeats, device=device) / 1e3)


def parameter_sets(n_params: int, device: str) -> int:
    """Sets in rotation: enough that their combined working set is L2_MULTIPLE× the L2 cache (1 when one is)."""
    if torch.device(device).type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, math.ceil(L2_MULTIPLE * l2 / (16 * n_params)))


def step_ms(cls, kw: dict, name: str, sets: int, repeats: int, device: str) -> float:
    opts = [cls(make_params(name, seed=i, device=device), lr=1e-3, weight_decay=0.01, **kw) for i in range(sets)]
    turn = [0]

    def step():
        opts[turn[0] % sets].step()
        turn[0] += 1

    return median_ms(step, repeats, device=device)  # the parameter sets are freed on return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy that measures bandwidth")
    add_output_args(p)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.smoke:
        raise SystemExit("bench/optimizer_step.py needs a CUDA device (CPU: bench/optimizer_step_cpu.py; --smoke)")
    shapes = list(SMOKE) if args.smoke else list(PYTHIA)
    repeats = 3 if args.smoke else args.repeats
    copy_bytes = (8 << 20) if args.smoke else int(args.copy_gib * 2**30)
    env = environment(device)
    bw = copy_bandwidth(copy_bytes, max(3, repeats // 2), device)
    print(f"{env['device_name']}: copy bandwidth {bw / 1e9:.0f} GB/s; torch {torch.__version__}")
    rows, targets = [], []
    for name in shapes:
        n = sum(math.prod(shape) for shape in pythia_shapes(name))
        sets = parameter_sets(n, device)
        floor = n * BYTES_PER_PARAM / bw * 1e3
        print(f"\n{name}: {n:,} params, floor {floor:.3f} ms at {BYTES_PER_PARAM} B/param, {sets} set(s) in rotation")
        times = {}
        for label, cls, kw in VARIANTS:
            ms = step_ms(cls, kw, name, sets, repeats, device)
            if device == "cuda":
                torch.cuda.empty_cache()  # the next variant allocates its own sets (1.4B: 22 GB each)
            times[label] = ms
            gbs = n * BYTES_PER_PARAM / (ms / 1e3) / 1e9
            ratio = ms / times[VARIANTS[0][0]]
            print(f"  {label:36s} {ms:8.3f} ms {gbs:7.0f} GB/s {100 * gbs * 1e9 / bw:5.1f}% copy  {ratio:5.2f}x fused")
            rows.append(dict(shape=name, params=n, sets=sets, variant=label, ms=ms, gb_s=gbs,
                             pct_copy=100 * gbs * 1e9 / bw, x_torch_fused=ratio, floor_ms=floor))  # fmt: skip
        ours = times[VARIANTS[2][0]]
        targets.append(target(f"{name}: InstrumentedAdamW fused / torch fused step time",
                              ours / times[VARIANTS[0][0]], "<=", 1.0, "x"))  # fmt: skip
        targets.append(target(f"{name}: InstrumentedAdamW fused, % of copy bandwidth at 28 B/param",
                              100 * floor / ours, ">=", 85.0, "%"))  # fmt: skip
    write_json(args.json, "optimizer_step", args, env, rows, targets, copy_bandwidth_gb_s=bw / 1e9,
               bytes_per_param=BYTES_PER_PARAM)  # fmt: skip


if __name__ == "__main__":
    main()
