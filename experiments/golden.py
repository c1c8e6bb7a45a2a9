"""The CPU study's golden regression run: ``python -m experiments.golden [--write]``.

The first :data:`STEPS` steps of the rise-phase recipe (``configs/cpu_study/rise.yaml``: model, optimizer, schedule,
batch) trained on a committed English text, with the force shares, loss and λ compared against
``tests/data/golden/cpu_rise.json`` by ``tests/test_golden.py``: a change to the optimizer, the data path, the
model or the monitor that moves the physics fails CI.

Why not a slice of the study's corpus: ``../shared/data`` may not be copied into the repository. The text is
Python's reference documentation as shipped in CPython's ``pydoc_data/topics.py`` (PSF License; 465 kB of English
prose and code, 95 kB as ``xz``), tokenized at test time by the study's tokenizer through the trainer's local-text
path — so the tokenizer and the data pipeline are inside what the test guards.

``--write`` regenerates the golden file, and measures what the tolerances rest on: the same run with 1 instead of 2
threads (another reduction order) and with AVX2 instead of AVX-512 kernels in ATen, oneDNN and MKL (what a CPU of
another generation runs), and, as the change the test must catch, the run with the peak lr 10% higher. Each
tolerance is :data:`MARGIN` times the larger of those two spreads, at least :data:`FLOOR` (relative); ``--write``
refuses tolerances that would not catch the lr change.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "golden"
TEXT = DATA / "pydoc_topics.txt.xz"
GOLDEN = DATA / "cpu_rise.json"
CONFIG = ROOT / "configs" / "cpu_study" / "rise.yaml"
STEPS = 150
CHECK_STEPS = (50, 100, 150)
#: Tolerance = MARGIN x the measured 1-vs-2-thread difference, and never below FLOOR (relative to the value).
MARGIN = 5.0
FLOOR = 1e-4
#: The run's settings beyond the recipe: the text, the launch cut at STEPS, and logs at every checked step.
VALID_FRACTION = 0.06


def write_text(out: Path) -> tuple[Path, Path]:
    """The committed text split into ``train.txt`` and ``valid.txt`` (documents: the topics, blank-line separated)."""
    topics = lzma.decompress(TEXT.read_bytes()).decode().split("\n\x1e\n")
    n_valid = max(1, round(VALID_FRACTION * len(topics)))
    out.mkdir(parents=True, exist_ok=True)
    train, valid = out / "train.txt", out / "valid.txt"
    train.write_text("\n\n".join(topics[:-n_valid]))
    valid.write_text("\n\n".join(topics[-n_valid:]))
    return train, valid


def overrides(work: Path, name: str = "golden") -> list[str]:
    train, valid = write_text(work / "text")
    return [
        "data.source=local", f"data.train_files=[{train}]", f"data.valid_files=[{valid}]",
        "data.tokenizer=configs/cpu_study/tokenizer.json", f"data.cache_dir={work / 'cache'}",
        f"schedule.stop_at={STEPS}", "logging.log_every=10", f"logging.eval_every={STEPS}", "logging.eval_batches=4",
        "logging.weibull_every=50", "logging.progress=false", "logging.report=false", "checkpoint.every=1000",
        "checkpoint.early=[]", f"checkpoint.resume_every={STEPS}", f"run.out_dir={work}", f"run.name={name}",
        "run.seed=1",
    ]  # fmt: skip


def values(run_dir: Path) -> dict[str, float]:
    """What the golden file pins: per checked step the interval's loss and Transmission shares and RMS, the
    class-mean λ and median k of the fit, and the validation loss at the end."""
    from instrumented_adamw.analysis.runs import load_run

    run = load_run(run_dir)
    out: dict[str, float] = {}
    metrics = {m["step"]: m for m in run.metrics}
    fits = {w["step"]: w for w in run.weibull}
    for step in CHECK_STEPS:
        m = metrics[step]
        out[f"loss@{step}"] = m["loss"]
        for key in ("align_share", "inject_share", "decay_share", "rms"):
            out[f"{key}@{step}"] = m[f"Transmission/{key}"]
        blocks = [b for b in fits[step]["blocks"] if b["cls"] == "Transmission"]
        out[f"lambda@{step}"] = sum(b["lam"] for b in blocks) / len(blocks)
        ks = sorted(b["k"] for b in blocks)
        out[f"k_median@{step}"] = 0.5 * (ks[(len(ks) - 1) // 2] + ks[len(ks) // 2])
    out[f"val_loss@{STEPS}"] = metrics[STEPS]["val_loss"]
    return out


#: Environment that makes ATen, oneDNN and MKL run their AVX2 kernels on an AVX-512 machine.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run(work: Path, extra: list[str] | None = None, threads: int | None = None, name: str = "golden",
        env_extra: dict[str, str] | None = None) -> dict:  # fmt: skip
    """Train the golden run in a subprocess (its own thread count) and return :func:`values`."""
    cmd = [sys.executable, "-m", "train", str(CONFIG), *overrides(work, name), *(extra or [])]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"golden run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return values(work / name)


def compare(got: dict[str, float], golden: dict[str, Any]) -> list[str]:
    """Every value outside its tolerance, as ``key: got vs golden ± tol``."""
    bad = []
    for key, want in golden["values"].items():
        tol = golden["tolerance"][key]
        value = got.get(key, math.nan)
        if not abs(value - want) <= tol:
            bad.append(f"{key}: {value!r} vs golden {want!r} ± {tol:.3g}")
    return bad


def tolerances(golden: dict[str, float], *others: dict[str, float]) -> dict[str, float]:
    return {k: max(MARGIN * max(abs(o[k] - golden[k]) for o in others), FLOOR * abs(golden[k])) for k in golden}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.golden", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate {GOLDEN.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        two = run(work, threads=2, name="two_threads")
        if not args.write:
            bad = compare(two, json.loads(GOLDEN.read_text()))
            print("\n".join(bad) or "golden: every value within tolerance")
            return 1 if bad else 0
        one = run(work, threads=1, name="one_thread")
        avx2 = run(work, threads=2, name="avx2", env_extra=AVX2)
        from train.config import load_config

        peak = load_config(CONFIG).optim.lr
        moved = run(work, [f"optim.lr={1.1 * peak!r}"], threads=2, name="lr_plus_10pct")
    tol = tolerances(two, one, avx2)
    caught = [k for k in two if abs(moved[k] - two[k]) > tol[k]]
    record = dict(
        what=f"the first {STEPS} steps of {CONFIG.relative_to(ROOT)} on {TEXT.relative_to(ROOT)}",
        values=two, tolerance=tol, one_thread=one, avx2=avx2, lr_plus_10pct=moved,
        rule=f"tolerance = max({MARGIN:g} x max(|1 thread - 2 threads|, |AVX2 - AVX-512|), {FLOOR:g} x |value|)",
        caught_by_lr_plus_10pct=caught,
    )  # fmt: skip
    if len(caught) < len(two) // 2:
        print(
            f"golden: the tolerances catch a 10% lr change in only {len(caught)} of {len(two)} values", file=sys.stderr
        )
        return 1
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"golden: wrote {GOLDEN.relative_to(ROOT)}; a 10% lr change moves {len(caught)} of {len(two)} values out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
