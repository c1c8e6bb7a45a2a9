"""Start-up: ``import instrumented_adamw`` and ``instrumented-adamw --help`` against ``import torch``.

    python bench/import_time.py [--rounds 7] [--json out.json]

Each command is a fresh interpreter (what a user waits for), timed as a whole process; the three commands run
interleaved, round after round (no command always first), after one untimed round that warms the file cache.
Reported: each command's median and its ratio to ``import torch``'s median. Targets: the library ≤ 1.15× torch,
the CLI's help ≤ 1.3×.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import environment, target, write_json

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import instrumented_adamw": [sys.executable, "-c", "import instrumented_adamw"],
    "instrumented-adamw --help": [sys.executable, "-m", "instrumented_adamw.cli", "--help"],
}
TARGETS = {"import instrumented_adamw": 1.15, "instrumented-adamw --help": 1.3}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="two rounds (checks that the script runs)")
    args = p.parse_args()
    rounds = 2 if args.smoke else args.rounds
    names = list(COMMANDS)
    for name in names:
        timed(COMMANDS[name])  # the file cache warm for every command
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(COMMANDS[name]))
    base = statistics.median(times["import torch"])
    rows, targets = [], []
    for name in names:
        med = statistics.median(times[name])
        rows.append(dict(command=name, median_s=med, ratio=med / base, runs=len(times[name])))
        print(f"{name:28s} {med:7.3f} s  {med / base:5.2f}x import torch")
        if name in TARGETS:
            targets.append(target(f"{name} / import torch", med / base, "<=", TARGETS[name], "x"))
    write_json(args.json, "import_time", args, environment("cpu"), rows, targets, rounds=rounds)


if __name__ == "__main__":
    main()
