"""Muon step time: InstrumentedMuon (tracking every tensor every step) vs torch.optim.Muon, in one process.

The parameters are the hidden matrices of a model (what the hybrid split hands Muon: attention QKV and output, MLP
in and out), Pythia-70M by default, with fixed gradients. Each variant is warmed up (``--warmup`` steps: a fresh
optimizer's first steps are several times slower on a VM), then the variants are timed in ``--rounds`` interleaved
rounds, one step each per round in a rotating order. Newton–Schulz dominates the step; the tracking adds per-tensor
dot products over W, O and the decay term. Target (issue 18): tracking adds ≤ 3% to the step.

    python bench/muon_step_cpu.py                 # Pythia-70M's 24 hidden matrices (19M parameters)
    python bench/muon_step_cpu.py --model pythia-smoke --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys

import torch
from common import hardware, make_params, timer

from instrumented_adamw import InstrumentedMuon

TARGET = 1.03  # InstrumentedMuon / torch.optim.Muon, median step time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pythia-70m", help="parameter shapes from bench/common.py")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"hardware: {hardware('cpu')}; torch {torch.__version__}; {platform.platform()}")
    # Muon takes the 2-D hidden matrices only: drop vectors and the two vocabulary matrices (first and last).
    params = [p for p in make_params(args.model)[1:-1] if p.ndim == 2]
    n = sum(p.numel() for p in params)
    print(f"{args.model}: {n:,} fp32 parameters in {len(params)} hidden matrices; warm-up {args.warmup}, "
          f"{args.rounds} rounds")  # fmt: skip
    kw = dict(lr=1e-3, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    steps = {
        "torch Muon": torch.optim.Muon(params, **kw).step,
        "InstrumentedMuon (tracking every step)": InstrumentedMuon(params, **kw).step,
        "InstrumentedMuon (track=False)": InstrumentedMuon(params, track=False, **kw).step,
    }
    for label, step in steps.items():
        for _ in range(args.warmup):
            step()
        print(f"  warmed up {label}", flush=True)
    clock = timer("cpu")
    times: dict[str, list[float]] = {label: [] for label in steps}
    labels = list(steps)
    for r in range(args.rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:  # rotate: none always runs first
            times[label].append(clock(steps[label]))
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
    base = ms["torch Muon"]
    for label, t in ms.items():
        print(f"{label:42s} {t:8.1f} ms/step  {t / base:6.3f}×")
    ratio = ms["InstrumentedMuon (tracking every step)"] / base
    print(f"target: tracking adds ≤ {100 * (TARGET - 1):.0f}% to the Muon step: {ratio:.3f}× "
          f"({'met' if ratio <= TARGET else 'MISSED'})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=shlex.join([sys.executable, *sys.argv]), hardware=hardware("cpu"),
                           torch=torch.__version__, model=args.model, params=n, warmup=args.warmup,
                           rounds=args.rounds, ms=ms, all_ms={k: [1e3 * x for x in v] for k, v in times.items()},
                           ratio=ratio, target=TARGET, met=ratio <= TARGET), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
