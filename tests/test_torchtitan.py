"""The torchtitan integration (instrumented_adamw.torchtitan) on torchtitan's own components: its debug Llama 3
parallelised by its parallelize_llama with FSDP2 on 2 gloo ranks, optimizers from its container's factory,
checkpoints through its flat DCP state dicts, metrics through its MetricsProcessor (tests/titan_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instrumented_adamw.optim.forces import fp32_closure_bound

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "titan_worker.py"


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("titan")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), "fsdp",
           str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "fsdp.json").read_text())


def test_the_factory_builds_instrumented_adamw_under_torchtitans_canonical_names(fsdp):
    assert fsdp["tracked"] == fsdp["names"] == fsdp["group_names"] and len(fsdp["names"]) == 45
    assert "layers.0.attention.qkv_linear.wqkv.weight" in fsdp["names"]
    assert set(fsdp["placements"].values()) == {"(Shard(dim=0),)"}  # every parameter an FSDP2 shard


def test_forces_close_the_full_tensors_norms_within_the_fp32_bound(fsdp):
    for step in fsdp["closure"]:
        for name, f in step.items():
            bound = fp32_closure_bound(f["w_sq"], f["w_sq_after"], f["u_sq"], f["lr"], f["weight_decay"])
            total = f["align"] + f["inject"] + f["decay"] + f["higher_order"]
            assert abs(total - f["delta"]) <= bound, (name, total, f["delta"], bound)


def test_the_budgets_reach_torchtitans_loggers(fsdp):
    """log_freq 3 (torchtitan also logs step 1); Weibull medians on multiples of weibull_every."""
    logged = {m["step"]: m for m in fsdp["logged"]}
    assert sorted(logged) == [1, 3, 6]
    last = logged[6]
    assert 0 < last["forces/Transmission/align_share"] < 1 and "loss_metrics/global_avg_loss" in last
    assert {f"forces/layer{i}/inject_share" for i in range(6)} <= set(last)
    assert "forces/weibull/Transmission/k_median" in last and "forces/weibull/Transmission/k_median" not in logged[1]
    assert fsdp["jsonl"] == ["forces.jsonl", "metrics.jsonl", "weibull.jsonl"]


def test_checkpoints_round_trip_through_torchtitans_dcp_state_dicts(fsdp):
    """Materialising state for the save or the load (torchtitan's zero-lr step) is not counted; the counter comes
    back from the flat state dict, and training goes on to the same parameters bitwise."""
    resumed = fsdp["resumed"]
    assert resumed["calls_before_load"] == 0 and resumed["calls"] == 3 and resumed["steps"] == fsdp["calls"] == 6
    assert resumed["params"] == fsdp["params"]
