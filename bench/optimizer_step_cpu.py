"""Optimizer step time: InstrumentedAdamW (tracking every tensor every step) vs torch.optim.AdamW, in one process.

Every variant is built on the same Pythia-70M-shaped parameters with fixed gradients (``bench/common.py``; each
optimizer has its own moments), warmed up (``--warmup`` steps each: the first steps of a fresh optimizer run several
times slower on a VM, and compiled variants compile there), then timed in ``--rounds`` interleaved rounds, one step
per variant per round, in a rotating order; the table gives medians and ratios against torch's fused, foreach and
compiled AdamW. The targets of the CPU-speed issue are checked at the end.

    python bench/optimizer_step_cpu.py                    # CPU, all variants (a few minutes, most of it compiling)
    python bench/optimizer_step_cpu.py --no-compile       # eager variants only
    python bench/optimizer_step_cpu.py --device cuda      # fused (Triton) and compiled variants on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from common import hardware, make_params, timer

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.kernels import cpu_adamw

#: The issue's targets: variant -> (baseline, largest ratio allowed).
TARGETS = {
    "InstrumentedAdamW fused": ("torch AdamW fused", 1.25),
    "InstrumentedAdamW compiled": ("torch AdamW compiled", 1.05),
    "InstrumentedAdamW foreach": ("torch AdamW foreach", 1.2),
}
BASELINES = ("torch AdamW fused", "torch AdamW foreach", "torch AdamW compiled")


def variants(device: str, compile_: bool) -> list[tuple[str, type, dict, str]]:
    """(label, optimizer class, constructor flags, how to step: eager / compiled / two-pass)."""
    rows = [
        ("torch AdamW fused", torch.optim.AdamW, {"fused": True}, "eager"),
        ("InstrumentedAdamW fused", InstrumentedAdamW, {"fused": True}, "eager"),
    ]
    if device == "cpu":
        rows += [
            ("InstrumentedAdamW fused, two-pass fallback", InstrumentedAdamW, {"fused": True}, "two-pass"),
            ("torch AdamW foreach", torch.optim.AdamW, {"foreach": True}, "eager"),
            ("InstrumentedAdamW foreach", InstrumentedAdamW, {"foreach": True}, "eager"),
            ("torch AdamW default (single-tensor)", torch.optim.AdamW, {}, "eager"),
            ("InstrumentedAdamW default", InstrumentedAdamW, {}, "eager"),
        ]
    else:
        rows += [
            ("torch AdamW foreach", torch.optim.AdamW, {"foreach": True}, "eager"),
            ("InstrumentedAdamW foreach", InstrumentedAdamW, {"foreach": True}, "eager"),
        ]
    if compile_:
        rows += [
            ("torch AdamW compiled", torch.optim.AdamW, {}, "compiled"),
            ("InstrumentedAdamW compiled", InstrumentedAdamW, {}, "compiled"),
            ("torch AdamW compiled, fused", torch.optim.AdamW, {"fused": True}, "compiled"),
            ("InstrumentedAdamW compiled, fused", InstrumentedAdamW, {"fused": True}, "compiled"),
        ]
    return rows


def make_step(opt: torch.optim.Optimizer, how: str) -> Callable[[], None]:
    if how == "compiled":  # as torch documents for its optimizers: torch.compile around opt.step()
        return torch.compile(opt.step, fullgraph=False)
    if how == "two-pass":  # the path fused=True takes where the C kernel cannot be built (no compiler)
        opt._cpu_kernel_fits = lambda group, local, warn: False  # type: ignore[attr-defined]
    return opt.step


def interleaved_times(rows, params, args) -> dict[str, list[float]]:
    """Each variant built and warmed up, then timed one step per variant per round, in rotating order."""
    device = args.device
    steps, built = {}, {}
    for label, cls, flags, how in rows:
        t0 = time.perf_counter()
        opt = cls(params, lr=1e-3, weight_decay=0.01, **flags)
        step = make_step(opt, how)
        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        steps[label], built[label] = step, time.perf_counter() - t0
        print(f"  warmed up {label} ({built[label]:.1f} s)", flush=True)
    clock = timer(device)
    times: dict[str, list[float]] = {label: [] for label in steps}
    labels = list(steps)
    for r in range(args.rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate: no variant always runs first
        for label in order:
            times[label].append(clock(steps[label]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="pythia-70m", help="parameter shapes from bench/common.py")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the rounds")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds, one timed step per variant each")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"hardware: {hardware(device)}; torch {torch.__version__}; {platform.platform()}")
    if device == "cpu":
        print(f"CPU path of fused=True: {cpu_adamw.status()}")
    # One parameter set with fixed gradients, shared by all optimizers (each keeps its own moments): timing does
    # not depend on the values, and ten copies of 70M parameters would not fit beside each other.
    params = make_params(args.model, device=device)
    n = sum(p.numel() for p in params)
    print(f"{args.model}: {n:,} fp32 parameters in {len(params)} tensors; warm-up {args.warmup}, {args.rounds} rounds")

    times = interleaved_times(variants(device, not args.no_compile), params, args)
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}

    bases = [b for b in BASELINES if b in ms]
    print(
        f"{'variant':44s} {'ms/step':>8s}  " + "  ".join(f"{'× ' + b.removeprefix('torch AdamW '):>12s}" for b in bases)
    )
    for label, t in ms.items():
        print(f"{label:44s} {t:8.1f}  " + "  ".join(f"{t / ms[b]:12.2f}" for b in bases))
    verdicts = {}
    for label, (base, limit) in TARGETS.items():
        if label in ms and base in ms:
            ratio = ms[label] / ms[base]
            verdicts[label] = {"baseline": base, "ratio": ratio, "target": limit, "met": ratio <= limit}
            print(f"target {label} ≤ {limit}× {base}: {ratio:.2f}× ({'met' if ratio <= limit else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": shlex.join([sys.executable, *sys.argv]),
                    "hardware": hardware(device),
                    "torch": torch.__version__,
                    "device": device,
                    "model": args.model,
                    "params": n,
                    "warmup": args.warmup,
                    "rounds": args.rounds,
                    "cpu_path": str(cpu_adamw.status()) if device == "cpu" else None,
                    "ms": ms,
                    "all_ms": {k: [1e3 * x for x in v] for k, v in times.items()},
                    "targets": verdicts,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
