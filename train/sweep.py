"""``python -m train.sweep SWEEP.yaml [--parallel N] [section.field=value ...]``: a grid of runs.

A sweep file is a run config (usually ``base: pythia70m_wikitext103.yaml``) plus a ``sweep:`` section::

    sweep:
      name: lr{optim.lr}_s{run.seed}      # run.name of each point, formatted from its settings
      grid:
        optim.lr: [3.0e-4, 1.0e-3, 3.0e-3]
        run.seed: [1, 2]

Each point runs as its own ``python -m train`` process (isolated; resumable like any run), up to ``--parallel`` at
a time: small models leave one GPU mostly idle, so several fit side by side. Points already finished are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from train.checkpoint import latest_resume_step
from train.config import ConfigError, load_config


def expand(path: Path, extra: list[str]) -> list[tuple[str, list[str]]]:
    """(run name, overrides) of every grid point, validated up front (a typo fails before anything runs)."""
    spec = (yaml.safe_load(path.read_text()) or {}).get("sweep")
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"{path} has no sweep.grid mapping of field -> list of values")
    keys = list(spec["grid"])
    values = [v if isinstance(v, list) else [v] for v in spec["grid"].values()]
    pattern = spec.get("name", "_".join(f"{{{k}}}" for k in keys))
    points = []
    for combo in itertools.product(*values):
        settings = dict(zip(keys, combo, strict=True))
        name = pattern
        for k, v in settings.items():
            name = name.replace(f"{{{k}}}", f"{v:g}" if isinstance(v, float) else str(v))
        overrides = [*extra, *(f"{k}={v}" for k, v in settings.items()), f"run.name={name}"]
        load_config(path, overrides)  # validate now
        points.append((name, overrides))
    if len({n for n, _ in points}) != len(points):
        raise ConfigError(f"sweep.name {pattern!r} gives several points the same run name")
    return points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.field=value for every point, before or after options")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (e.g. 3 small runs on one GPU)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --parallel N
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.config)
    try:
        points = expand(path, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    todo = []
    for name, overrides in points:
        cfg = load_config(path, overrides)
        if latest_resume_step(Path(cfg.run.out_dir) / name) == cfg.schedule.total_steps:
            print(f"{name}: already finished, skipped")
        else:
            todo.append((name, overrides))
    env = dict(os.environ)
    if args.parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))  # CPU runs share the cores
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < args.parallel:
            name, overrides = todo.pop(0)
            cmd = [sys.executable, "-m", "train", str(path), *overrides, "logging.progress=false"]
            print(f"{name}: started")
            running.append((name, subprocess.Popen(cmd, env=env)))
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"{name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}")
                if proc.returncode:
                    failed.append(name)
        time.sleep(0.2)
    print(f"sweep of {len(points)} runs finished in {time.perf_counter() - t0:.1f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
