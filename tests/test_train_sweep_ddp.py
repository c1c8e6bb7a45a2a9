"""Sweeps expand a grid into isolated runs; torchrun DDP on gloo matches the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from instrumented_adamw.sinks import read_jsonl
from train.config import ConfigError, load_config
from train.sweep import expand, main

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "data.synthetic_tokens=50000",
    "schedule.total_steps=20",
    "schedule.warmup_steps=2",
    "logging.log_every=10",
    "logging.eval_every=10",
    "logging.weibull_every=0",
    "logging.progress=false",
    "checkpoint.resume_every=10",
    "checkpoint.every=10",
    "checkpoint.early=[]",
    "logging.report=false",
]


def test_sweep_grid_runs_every_point_once(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"base: {ROOT / 'configs' / 'demo.yaml'}\n"
        "sweep:\n  name: lr{optim.lr}_s{run.seed}\n  grid:\n    optim.lr: [1.0e-3, 3.0e-3]\n    run.seed: [1]\n"
    )
    extra = [f"run.out_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL]
    points = expand(sweep, extra)
    assert [n for n, _ in points] == ["lr0.001_s1", "lr0.003_s1"]
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    assert main([str(sweep), *extra, "--parallel", "2"]) == 0
    for name, lr in (("lr0.001_s1", 1e-3), ("lr0.003_s1", 3e-3)):
        metrics = read_jsonl(tmp_path / "runs" / name / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [10, 20]
        assert load_config(tmp_path / "runs" / name / "config.yaml").optim.lr == lr
    assert "failed: none" in capsys.readouterr().out
    assert main([str(sweep), *extra]) == 0  # finished points are skipped, not rerun
    assert capsys.readouterr().out.count("already finished, skipped") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'configs' / 'demo.yaml'}\nsweep:\n  grid:\n    optim.lrr: [1]\n")
    with pytest.raises(ConfigError, match="unknown key"):
        expand(bad, [])


def test_torchrun_ddp_on_gloo_matches_single_process(tmp_path):
    common = [str(ROOT / "configs" / "demo.yaml"), f"run.out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    common += SMALL
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, "-m", "train", *common, "run.name=single"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *common,
         "run.name=ddp", "distributed.strategy=ddp"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in b] == [10, 20]  # rank 0 alone writes, once per log step
    for ra, rb in zip(a, b, strict=True):
        # Each rank averages 8 of the 16 sequences; DDP averages the two means: the same gradient up to fp32
        # summation order, so the trajectories agree to rounding over 20 steps.
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
        assert rb["Transmission/align_share"] == pytest.approx(ra["Transmission/align_share"], rel=1e-3)
