"""The CPU benchmark scripts still run. (The evidence command's dry run, tests/test_evidence.py, starts the GPU ones
without reading what they print; monitor_overhead's breakdown is read here.)

Each at its smallest size, as a user would start it; asserted on its output, never on a time. A benchmark that
broke silently (an optimizer method's signature changed under a monkeypatched variant) is a figure nobody can
reproduce.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "optimizer_step_cpu": (["--model", "pythia-smoke", "--no-compile", "--warmup", "1", "--rounds", "1"],
                           ["InstrumentedAdamW fused, two-pass fallback", "InstrumentedAdamW foreach"]),
    "muon_step_cpu": (["--model", "pythia-smoke", "--warmup", "1", "--rounds", "1"], ["InstrumentedMuon"]),
    "reductions_cpu": (["--numel", "70000"], ["float64"]),
    "monitor_overhead": (["--smoke"], ["of a log (median, every read):", "read_forces", "aggregate", "write"]),
}  # fmt: skip


@pytest.mark.parametrize("script", CASES)
def test_cpu_benchmark_runs(script, tmp_path):
    args, expected = CASES[script]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, f"{text!r} not in the output:\n{done.stdout[-2000:]}"
