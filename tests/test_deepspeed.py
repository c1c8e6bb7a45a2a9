"""DeepSpeed ZeRO on CPU (``DS_ACCELERATOR=cpu``, gloo, 2 ranks, fp32; tests/deepspeed_worker.py): stages 1 and 2
report each parameter's forces under the model's names, closing the change of ‖W‖² of the gathered fp32 parameters
within the fp32 bound, equal to a stage-0 run to fp32 rounding, and continue bitwise after a checkpoint resume;
stage 3 is refused with a message that says what works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instrumented_adamw.optim.forces import fp32_closure_bound

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "deepspeed_worker.py"
FORCES = ("align", "inject", "decay", "higher_order")


def launch(mode: str, stage: int | str, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), mode,
           str(stage), str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    launch("run", "0,1,2", out)
    shutil.copytree(out / "logs_stage2", out / "resumed_stage2")  # the resumed run appends to the first run's logs
    launch("resume", 2, out)
    found = {s: json.loads((out / f"run_stage{s}.json").read_text()) for s in (0, 1, 2)}
    found["resumed"] = json.loads((out / "resume_stage2.json").read_text())
    found["out"] = out
    return found


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_reports_every_parameter_by_name(runs, stage):
    r = runs[stage]
    assert r["flat_shapes"] == [[11264], [384]], "DeepSpeed handed the optimizer its flat partitions"
    assert sorted(r["tracked"]) == sorted(r["names"]) and len(r["names"]) == 28
    for rec in r["records"]:
        assert set(rec["forces"]) == set(r["names"])
        assert rec["calls"] == rec["step"], "one count per optimizer step, though DeepSpeed calls step() per group"
        for name, f in rec["forces"].items():
            assert f["steps"] == 1 and f["inject"] > 0, name  # measured: a step of any direction injects
            if "norm" not in name and "bias" not in name:  # the decayed group: the matrices
                assert f["decay"] < 0, name


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_closes_the_gathered_norms_within_the_fp32_bound(runs, stage):
    """Σ forces of each step = ‖W₊‖² − ‖W‖² of the gathered fp32 master weights (DeepSpeed's
    safe_get_full_fp32_param), within the fp32 bound; ‖W‖² before the step as measured = as gathered."""
    worst = 0.0
    for rec in runs[stage]["records"]:
        for name, f in rec["forces"].items():
            before, after = rec["before"][name], rec["after"][name]
            assert f["w_sq"] == pytest.approx(before, rel=1e-9, abs=1e-12), name
            bound = fp32_closure_bound(before, after, f["u_sq"], f["last_lr"], f["last_weight_decay"])
            worst = max(worst, abs(after - before - sum(f[k] for k in FORCES)) / bound, abs(f["residual"]) / bound)
    assert 0 < worst <= 1.0  # observed ~0.05 of the bound


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_equals_stage_0(runs, stage):
    """The same model, data and optimizer without partitions: forces agree to fp32 rounding (DeepSpeed averages the
    gradients in another order under ZeRO), weights to 1e-6."""
    worst = 0.0
    for a, b in zip(runs[0]["records"], runs[stage]["records"], strict=True):
        for name, fa in a["forces"].items():
            fb = b["forces"][name]
            budget = abs(fa["align"]) + fa["inject"] + abs(fa["decay"])
            worst = max(worst, *(abs(fa[k] - fb[k]) / budget for k in FORCES))
            assert b["after"][name] == pytest.approx(a["after"][name], rel=1e-6), name
    assert worst < 1e-4  # observed 9e-6 of the step's budget


def test_zero_resume_continues_the_books(runs):
    """Killed after step 3 and resumed from DeepSpeed's checkpoint in new processes: the same forces bitwise, the
    step count goes on, and the logs equal the uninterrupted run's."""
    full, resumed = runs[2]["records"], runs["resumed"]["records"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["calls"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed, strict=True):
        assert a["forces"] == b["forces"]
    out = runs["out"]
    for kind in ("metrics", "forces"):
        whole = [json.loads(line) for line in (out / "logs_stage2" / f"{kind}.jsonl").read_text().splitlines()]
        again = [json.loads(line) for line in (out / "resumed_stage2" / f"{kind}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(whole, again, strict=True):
            a.pop("time", None), b.pop("time", None)
            assert a == b


def test_zero_3_is_refused_with_what_works(tmp_path):
    done = launch("run", 3, tmp_path, check=False)
    assert done.returncode != 0
    assert "DeepSpeed ZeRO stage 3" in done.stderr and "Use ZeRO stage 1 or 2" in done.stderr
    assert not (tmp_path / "run_stage3.json").exists()


HF_WORKER = Path(__file__).resolve().parent / "hf_deepspeed_worker.py"


def launch_hf(route: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HF_WORKER), route,
           str(out)]  # fmt: skip
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)


def test_hf_trainer_with_zero_2_through_accelerate(tmp_path):
    """The documented route under DeepSpeed (optimizer_cls_and_kwargs + the callback): forces in log_history on every
    log step, written once (rank 0), each interval closing the gathered fp32 norms within the fp32 bound."""
    done = launch_hf("cls_and_kwargs", tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    logged = [row for row in history if "Transmission/align_share" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]
    for row in logged:
        assert 0 < row["Transmission/align_share"] < 1 and 0 < row["Transmission/decay_share"] < 1
    records = [json.loads(line) for line in (tmp_path / "trainer" / "forces" / "forces.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6], "one writer"
    norms = json.loads((tmp_path / "norms0.json").read_text())
    worst = 0.0
    for r in records:
        assert len(r["tensors"]) == 28
        for name, f in r["tensors"].items():
            w0, w1 = norms[str(r["step"] - 2)][name], norms[str(r["step"])][name]
            w = max(w0, w1)  # the per-step bound grows with ‖W‖ and ‖û‖: steps × the bound at the interval's largest
            bound = f["steps"] * fp32_closure_bound(w, w, f["u_sq"], f["last_lr"], f["last_weight_decay"])
            worst = max(worst, abs(w1 - w0 - sum(f[k] for k in FORCES)) / bound)
    assert 0 < worst <= 1.0


def test_hf_trainer_with_deepspeed_names_the_working_route(tmp_path):
    """optimizers=(InstrumentedAdamW(...), None) is discarded by the Trainer under DeepSpeed: the callback says so
    and names optimizer_cls_and_kwargs, instead of suggesting what the user did."""
    done = launch_hf("optimizers", tmp_path)
    assert done.returncode != 0
    assert "under DeepSpeed the Trainer discards optimizers=(...)" in done.stderr
    assert "optimizer_cls_and_kwargs=(InstrumentedAdamW" in done.stderr
