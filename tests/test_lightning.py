"""The Lightning callback (instrumented_adamw.lightning) in real Lightning runs on CPU: one process, DDP on 2
processes, ModelParallelStrategy (FSDP2) on 2 processes, and a run resumed from a Lightning checkpoint
(tests/lightning_worker.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instrumented_adamw.sinks import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "lightning_worker.py"


def work(mode: str, out: Path, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(WORKER), mode, str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    found = {}
    for mode in ("ddp", "fsdp", "single"):
        found[mode] = tmp_path_factory.mktemp(mode)
        work(mode, found[mode])
    return found


def logged(out: Path) -> dict[int, dict[str, str]]:
    rows = list(csv.DictReader((out / "logs" / "version_0" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a step logged twice: more than one rank logged"
    return {int(r["step"]): r for r in rows}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank_zero_logs_the_budgets_and_they_match_the_parameters(runs, mode):
    """Every log step once (rank 0 only); the logged Transmission RMS equals the one computed from the gathered
    parameters at that step; Weibull medians on the fit steps; the full records beside the checkpoints."""
    out = runs[mode]
    rows = logged(out)
    assert sorted(rows) == [3, 6, 9, 12]
    independent = json.loads((out / "check.json").read_text())["rms"]
    for step, rms in independent.items():
        assert float(rows[int(step)]["forces/Transmission/rms"]) == pytest.approx(rms, rel=1e-9)
    assert 0 < float(rows[12]["forces/Transmission/align_share"]) < 1
    assert {f"forces/layer{i}/inject_share" for i in (0, 1)} <= set(rows[12])
    assert rows[6]["forces/weibull/Transmission/k_median"] and not rows[3]["forces/weibull/Transmission/k_median"]
    assert [r["step"] for r in read_jsonl(out / "ckpt" / "forces" / "forces.jsonl")] == [3, 6, 9, 12]


def test_a_run_resumed_from_a_lightning_checkpoint_continues_the_books(runs):
    out = runs["single"]
    before = read_jsonl(out / "ckpt" / "forces" / "metrics.jsonl")
    work("single", out, "resume")  # from last.ckpt (step 12) to step 18
    after = read_jsonl(out / "ckpt" / "forces" / "metrics.jsonl")
    assert [r["step"] for r in after] == [3, 6, 9, 12, 15, 18]
    assert after[:4] == before  # the records up to the checkpoint are kept as they were
    tau = [r["Transmission/t_over_tau"] for r in after]
    assert all(b > a for a, b in zip(tau, tau[1:], strict=False))  # T/τ goes on from the checkpoint's, not from 0
    assert tau[4] - tau[3] == pytest.approx(tau[3] - tau[2], rel=1e-9)
    resumed = json.loads((out / "check_resumed.json").read_text())["rms"]
    assert after[4]["Transmission/rms"] == pytest.approx(resumed["15"], rel=1e-9)
    assert [r["step"] for r in read_jsonl(out / "ckpt" / "forces" / "weibull.jsonl")] == [6, 12, 18]


def test_a_plain_optimizer_is_refused_with_the_fix():
    import lightning as L
    import torch

    from instrumented_adamw.lightning import ForceMonitorCallback

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.w(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ForceMonitorCallback()])  # fmt: skip
    with pytest.raises(TypeError, match=r"return InstrumentedAdamW\(self.named_parameters\(\).*got \['AdamW'\]"):
        trainer.fit(Plain(), data)
