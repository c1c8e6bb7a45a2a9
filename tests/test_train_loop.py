"""End-to-end CPU runs: loss falls, the run directory is complete, kill -9 + rerun equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instrumented_adamw.sinks import read_jsonl
from train.config import load_config
from train.loop import train
from train.models import PretrainedUnavailableError, build_model

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 120


def overrides(tmp: Path, name: str) -> list[str]:
    return [
        f"run.out_dir={tmp}",
        f"run.name={name}",
        f"data.cache_dir={tmp / 'cache'}",
        "data.synthetic_tokens=100000",
        f"schedule.total_steps={TOTAL}",
        "schedule.warmup_steps=10",
        "logging.log_every=10",
        "logging.eval_every=40",
        "logging.weibull_every=40",
        "logging.progress=false",
        "checkpoint.every=40",
        "checkpoint.resume_every=20",
        "checkpoint.early=[1, 2, 4]",
        "logging.report=false",
    ]


def steps(run: Path, kind: str) -> list[int]:
    return [r["step"] for r in read_jsonl(run / f"{kind}.jsonl")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return train(load_config(ROOT / "configs" / "demo.yaml", overrides(tmp, "ref")))


def test_short_run_learns_and_writes_a_complete_run_directory(reference_run):
    run = reference_run
    metrics = read_jsonl(run / "metrics.jsonl")
    assert steps(run, "metrics") == list(range(10, TOTAL + 1, 10))
    assert steps(run, "forces") == steps(run, "metrics")
    assert steps(run, "weibull") == [0, 40, 80, 120]
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]  # it learns the Markov chain
    assert [m["step"] for m in metrics if "val_loss" in m] == [40, 80, 120]
    assert metrics[-1]["val_loss"] < metrics[0]["loss"]
    share = metrics[-1]["Transmission/align_share"]
    assert 0 < share < 1 and metrics[-1]["Transmission/rms"] > 0
    forces = read_jsonl(run / "forces.jsonl")[-1]
    assert set(forces["classes"]) == {"Transmission", "QKV", "Other"} and set(forces["layers"]) == {"0", "1"}
    tensor = forces["tensors"]["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    assert tensor["cls"] == "Transmission" and tensor["steps"] == 10
    # Exact bookkeeping: the forces integrate to the change of ‖W‖² up to fp32 rounding, at most the per-step
    # fp32_closure_bound summed over the interval (at the interval's mean ‖W‖², ‖û‖² and the peak lr: the bound grows
    # with each), and a residual forced to zero would not pass: it is that rounding, so it is not exactly 0.
    from instrumented_adamw.optim.forces import fp32_closure_bound

    n = tensor["steps"]
    cfg = load_config(run / "config.yaml")
    bound = n * fp32_closure_bound(tensor["w_sq"] / n, tensor["w_sq_now"], tensor["u_sq"] / n, cfg.optim.lr,
                                   cfg.optim.weight_decay)  # fmt: skip
    assert 0 < abs(tensor["residual"]) <= bound
    weibull = read_jsonl(run / "weibull.jsonl")
    assert {b["cls"] for b in weibull[0]["blocks"]} == {"Transmission", "QKV", "Other"}
    k0 = [b["k"] for b in weibull[0]["blocks"] if b["cls"] == "Transmission"]
    assert all(abs(k - 1.2054) < 0.05 for k in k0)  # Gaussian init sits at the half-normal anchor
    # The logged fits follow the protocol exactly (mid-80: trim 0.1): refit the step-0 snapshot independently.
    from instrumented_adamw.weibull.fit import fit_weibull

    init = load_file(run / "checkpoints" / "step_000000" / "model.safetensors")
    for b in weibull[0]["blocks"]:
        assert weibull[0]["trim"] == 0.1
        key = b["name"] if b["name"] in init else b["name"].replace("lm_head.", "embed_out.")
        assert b["k"] == pytest.approx(fit_weibull(init[key], 0.1).k, rel=1e-12), b["name"]
    snaps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert snaps == ["step_000000", "step_000001", "step_000002", "step_000004", "step_000040", "step_000080",
                     "step_000120"]  # fmt: skip
    assert (run / "checkpoints" / "step_000040" / "config.json").is_file()
    assert load_config(run / "config.yaml").schedule.total_steps == TOTAL
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"


def test_kill_and_rerun_equals_uninterrupted(reference_run, tmp_path):
    cmd = [sys.executable, "-m", "train", str(ROOT / "configs" / "demo.yaml"), *overrides(tmp_path, "killed")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    pointer = run / "resume" / "latest.json"
    while time.time() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 40:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert killed_at < TOTAL
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(reference_run / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    b = load_file(run / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    for kind in ("metrics", "forces", "weibull"):
        assert steps(run, kind) == steps(reference_run, kind)  # no gap, no duplicate
    ref, got = read_jsonl(reference_run / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    for key in ("Transmission/align_share", "Transmission/t_over_tau", "Transmission/rms_eq"):
        assert [r[key] for r in got] == [r[key] for r in ref]  # the monitor's cumulative state resumes too


def test_stop_at_trains_the_first_steps_of_the_schedule_and_resumes(reference_run, tmp_path):
    """``schedule.stop_at`` cuts a launch short on the full run's schedule (the lr at each step is the full run's),
    and a later launch without it continues to the end, bitwise the uninterrupted run."""
    first = train(load_config(ROOT / "configs" / "demo.yaml", [*overrides(tmp_path, "cut"), "schedule.stop_at=60"]))
    ref = read_jsonl(reference_run / "metrics.jsonl")
    cut = read_jsonl(first / "metrics.jsonl")
    assert [r["step"] for r in cut] == [r["step"] for r in ref if r["step"] <= 60]
    assert [r["lr"] for r in cut] == [r["lr"] for r in ref if r["step"] <= 60]  # not a 60-step schedule
    assert [r["loss"] for r in cut] == [r["loss"] for r in ref if r["step"] <= 60]
    assert cut[-1].get("val_loss") is not None  # the launch's last step is evaluated
    assert json.loads((first / "resume" / "latest.json").read_text())["step"] == 60
    train(load_config(ROOT / "configs" / "demo.yaml", overrides(tmp_path, "cut")))
    a = load_file(reference_run / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    b = load_file(first / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    got = read_jsonl(first / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    with pytest.raises(Exception, match="stop_at must be in"):
        load_config(ROOT / "configs" / "demo.yaml", [*overrides(tmp_path, "x"), f"schedule.stop_at={TOTAL + 1}"])


def test_pretrained_model_offline_error_names_the_remedy(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(ROOT / "configs" / "continue_from_pythia70m.yaml").model
    with pytest.raises(PretrainedUnavailableError, match="model.pretrained=DIR"):
        build_model(cfg)


def test_pretrained_model_from_a_local_directory(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml").model
    torch.manual_seed(0)
    build_model(cfg).save_pretrained(tmp_path)
    torch.manual_seed(0)
    reference = build_model(cfg).state_dict()
    cfg.pretrained = str(tmp_path)
    torch.manual_seed(123)  # a fresh init would now differ: only loading the directory gives the saved weights
    loaded = build_model(cfg)
    assert loaded.config.hidden_size == 64
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_hybrid_muon_run_logs_both_optimizers_and_resumes_bitwise(tmp_path):
    """optim.name=muon: Muon on the hidden matrices, AdamW on the rest, one budget per class; killed mid-run and
    rerun, the final weights are bitwise those of an uninterrupted run."""
    args = [*overrides(tmp_path, "hy"), "optim.name=muon", "optim.muon_lr=0.02", "schedule.total_steps=40",
            "checkpoint.resume_every=20", "checkpoint.every=20", "logging.eval_every=20",
            "logging.weibull_every=20"]  # fmt: skip
    straight = train(load_config(ROOT / "configs" / "demo.yaml", [*args, "run.name=hy_straight"]))
    tensors = read_jsonl(straight / "forces.jsonl")[-1]["tensors"]
    owners = {n: t["optimizer"] for n, t in tensors.items()}
    assert owners["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"] == "InstrumentedMuon"
    assert owners["gpt_neox.embed_in.weight"] == owners["gpt_neox.layers.0.input_layernorm.bias"] == "InstrumentedAdamW"
    muon_entry = tensors["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"]
    assert muon_entry["last_update_lr"] > muon_entry["last_lr"]  # match_rms_adamw: 0.2·√max(A, B) > 1 here
    cmd = [sys.executable, "-m", "train", str(ROOT / "configs" / "demo.yaml"), *args, "run.name=hy_killed"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run(cmd, cwd=ROOT, env=dict(env, INSTRUMENTED_ADAMW_FAULT="step:31"), capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step 20" in done.stdout + done.stderr
    a = load_file(straight / "checkpoints" / "step_000040" / "model.safetensors")
    b = load_file(tmp_path / "hy_killed" / "checkpoints" / "step_000040" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_jsonl(tmp_path / "hy_killed" / "metrics.jsonl")] == [
        r["loss"] for r in read_jsonl(straight / "metrics.jsonl")
    ]
