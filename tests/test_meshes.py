"""Exact forces on DTensor meshes: tensor parallel, FSDP2 x TP, HSDP and tensors on different meshes in one optimizer
(4 gloo ranks on CPU, float64; tests/mesh_worker.py), against ‖W‖² of the gathered tensors and a single process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mesh_worker.py"
MODES = ("tp", "fsdp_tp", "hsdp", "mixed")
#: The process groups (by ranks, as rank 0 sees them) each read all-reduces over, in order: one per group that
#: shards some tensor, whatever the number of tensors.
READ_GROUPS = {
    "tp": [[0, 1, 2, 3]],
    "fsdp_tp": [[0, 2], [0, 1]],  # "dp" (norms, head and the matrices' first dimension), then "tp"
    "hsdp": [[0, 1]],  # the "shard" dimension only: the replicas are not summed
    "mixed": [[0, 1, 2, 3], [0, 1]],  # the FSDP mesh of the norms and head, then the blocks' TP pairs
}


def torchrun(what: str, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(WORKER), what,
           str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("meshes")
    torchrun("run", out)
    torchrun("resume", out)  # new processes: the states saved at step 5 of the first launch
    found = {m: json.loads((out / f"{m}.json").read_text()) for m in (*MODES, "muon")}
    for m in ("hsdp", "fsdp_tp"):
        found[m]["resumed"] = json.loads((out / f"{m}_resumed.json").read_text())
    return found


@pytest.mark.parametrize("mode", MODES)
def test_every_tensor_is_tracked_on_its_mesh(runs, mode):
    """Every tensor, whatever its placements (the head's 2-element gain on 4 FSDP ranks: two empty shards)."""
    r = runs[mode]
    assert r["tracked"] == r["names"] and len(r["names"]) == 15
    kinds = " ".join(r["placements"].values())
    expected = {
        "tp": ["Replicate()", "Shard(dim=1)", "plain"],
        "fsdp_tp": ["_StridedShard", "Shard(dim=0), Replicate()"],
        "hsdp": ["(Replicate(), Shard(dim=0))"],
        "mixed": ["Replicate()", "Shard(dim=1)"],
    }[mode]
    for kind in expected:
        assert kind in kinds, (mode, kind, r["placements"])


@pytest.mark.parametrize("mode", MODES)
def test_each_step_closes_the_change_of_the_full_tensors_norm(runs, mode):
    """Σ forces of a step = ‖W₊‖² − ‖W‖² of full_tensor(), to 1e-9 of the step's force budget, every tensor."""
    for step in runs[mode]["steps"]:
        for name, f in step.items():
            budget = abs(f["align"]) + f["inject"] + abs(f["decay"]) + abs(f["higher_order"])
            total = f["align"] + f["inject"] + f["decay"] + f["higher_order"]
            assert abs(total - f["delta"]) <= 1e-9 * budget, (mode, name, total, f["delta"])


@pytest.mark.parametrize("mode", MODES)
def test_forces_equal_a_single_process_run(runs, mode):
    """Interval sums within 1e-12 relative of the same model in one process (⟨W,û⟩ and align: of their condition
    scale √(‖W‖²‖û‖²)): the shards add their elements in another order, and the matmuls are split."""
    r = runs[mode]
    assert len(r["reads"]) == len(r["ref_reads"]) == 2
    for read, ref_read in zip(r["reads"], r["ref_reads"], strict=True):
        assert read["step"] == ref_read["step"]
        for name, ref in ref_read["interval"].items():
            row = read["interval"][name]
            assert row["steps"] == ref["steps"] == 5
            for key in ("u_sq", "w_sq", "inject", "decay", "eta_lambda"):
                assert row[key] == pytest.approx(ref[key], rel=1e-12, abs=0), (mode, name, key)
            scale = math.sqrt(ref["w_sq"] * ref["u_sq"])
            assert abs(row["w_dot_u"] - ref["w_dot_u"]) <= 1e-12 * scale, (mode, name)
            assert abs(row["align"] - ref["align"]) <= 2 * 1e-2 * 1e-12 * scale, (mode, name)  # 2η, η = 1e-2
        for got, want in zip(read["w_sq_now"], ref_read["w_sq_now"], strict=True):
            assert got == pytest.approx(want, rel=1e-12)
    for name, ref in r["ref_params"].items():
        assert max(abs(a - b) for a, b in zip(r["params"][name], ref, strict=True)) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_weibull_fits_of_the_gathered_matrices_equal_the_single_process_fits(runs, mode):
    """ForceMonitor.fit gathers each sharded matrix (full_tensor) and fits it on every rank."""
    r = runs[mode]
    fits = {b["name"]: b for b in r["fits"]}
    assert sorted(fits) == sorted(b["name"] for b in r["ref_fits"]) and len(fits) == 5  # 2 x (up, down) + head
    for ref in r["ref_fits"]:
        for key in ("k", "lam", "r2"):
            assert fits[ref["name"]][key] == pytest.approx(ref[key], rel=1e-9), (mode, ref["name"], key)


@pytest.mark.parametrize("mode", MODES)
def test_a_read_is_one_all_reduce_per_process_group(runs, mode):
    assert [read["all_reduces"] for read in runs[mode]["reads"]] == [READ_GROUPS[mode]] * 2


@pytest.mark.parametrize("mode", ["hsdp", "fsdp_tp"])
def test_a_resumed_run_continues_bitwise(runs, mode):
    """The step-5 state (DCP, the optimizer's flattened state dict with track_calls) loaded in new processes: the
    step counter comes back, and steps 6-10 give the same parameters and the same interval sums, bit for bit."""
    r, resumed = runs[mode], runs[mode]["resumed"]
    assert resumed["calls"] == 5 and r["calls"] == 10
    assert resumed["params"] == r["params"]
    (read,) = resumed["reads"]
    assert read["step"] == 10 and read["interval"] == r["reads"][-1]["interval"]
    assert read["w_sq_now"] == r["reads"][-1]["w_sq_now"]


def test_muon_on_fsdp2_x_tp_is_torch_muon_and_exact(runs):
    """Sharded matrices take torch's Muon step (Newton–Schulz on the DTensors): bitwise torch.optim.Muon's on the
    same mesh; the forces, from the local shards with O laid out as W, close each step's change of ‖W‖²."""
    r = runs["muon"]
    assert r["bitwise"] and sorted(r["tracked"]) == sorted(r["names"])
    for step in r["steps"]:
        for name, f in step.items():
            budget = abs(f["align"]) + f["inject"] + abs(f["decay"]) + abs(f["higher_order"])
            total = f["align"] + f["inject"] + f["decay"] + f["higher_order"]
            assert abs(total - f["delta"]) <= 1e-9 * budget, (name, total, f["delta"])


def test_partial_parameters_are_refused_with_the_fix(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    from instrumented_adamw import InstrumentedAdamW

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(DTensor.from_local(torch.ones(3, 2), mesh, [Partial()]))
        with pytest.raises(ValueError, match=r"w: DTensor placement P.*redistribute it to Shard or Replicate"):
            InstrumentedAdamW([("w", w)], lr=1e-3)
    finally:
        dist.destroy_process_group()
