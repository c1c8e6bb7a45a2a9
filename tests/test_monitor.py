"""Monitor and sinks: JSONL schema, wandb offline file read back, TensorBoard events, failing sinks, report, HF."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from models import tiny_model
from wandb_reader import history, run_file

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.analysis.report import PAPER_BUDGET, load_run, make_report, share_table
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.sinks import FanOut, JsonlSink, TensorBoardSink, WandbSink, read_jsonl, wandb_key
from train.config import load_config
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("Transmission", "QKV", "Other")
PER_CLASS = ("align_share", "inject_share", "decay_share", "rms", "net", "cos_w_u", "rel_residual")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sinks")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"run.out_dir={tmp}", "run.name=all_sinks", f"data.cache_dir={tmp / 'cache'}", "data.synthetic_tokens=60000",
         "schedule.total_steps=60", "logging.eval_every=30", "logging.weibull_every=30", "logging.progress=false",
         "logging.wandb=true", "logging.wandb_mode=offline", "logging.tensorboard=true", "checkpoint.every=30",
         "checkpoint.resume_every=30", "checkpoint.early=[]"],
    )  # fmt: skip
    out = train(cfg)
    mp.undo()
    return out


def test_jsonl_holds_every_log_step_once_with_the_documented_schema(run):
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(10, 61, 10))
    for m in metrics:
        assert {"step", "time", "loss", "lr", "throughput(tok/s)"} <= m.keys()
        assert {f"{c}/{k}" for c in CLASSES for k in PER_CLASS} <= m.keys()
    forces = read_jsonl(run / "forces.jsonl")
    last = forces[-1]
    tensors = last["tensors"]
    # Class shares are the paper definition over the class's tensors: |ΣF_a| / (|ΣF_a| + ΣF_i + Σ|F_d|).
    members = [t for t in tensors.values() if t["cls"] == "Transmission"]
    a, i, d = (sum(t[k] for t in members) for k in ("align", "inject", "decay"))
    assert last["classes"]["Transmission"]["align_share"] == pytest.approx(abs(a) / (abs(a) + i + abs(d)), rel=1e-12)
    assert metrics[-1]["Transmission/align_share"] == last["classes"]["Transmission"]["align_share"]
    layer0 = [t for t in tensors.values() if t["layer"] == 0]
    assert last["layers"]["0"]["align"] == pytest.approx(sum(t["align"] for t in layer0), rel=1e-12)
    weibull = read_jsonl(run / "weibull.jsonl")
    assert [w["step"] for w in weibull] == [0, 30, 60]
    assert {"name", "layer", "component", "cls", "k", "lam", "r2", "rms", "lam_over_rms", "gamma_bridge_lam"} <= set(
        weibull[-1]["blocks"][0]
    )


def test_wandb_offline_run_file_contains_the_same_values(run):
    rows = history(run_file(run / "wandb"))
    logged = {r["trainer/step"]: r for r in rows if "loss" in r}
    metrics = read_jsonl(run / "metrics.jsonl")
    assert sorted(logged) == [m["step"] for m in metrics]
    for m in metrics:
        row = logged[m["step"]]
        for key in ("loss", "lr", "Transmission/align_share", "QKV/rms"):
            assert row[wandb_key(key)] == m[key]
        assert row["forces/QKV/rms"] == m["QKV/rms"]  # class metrics in the forces/<class>/ section
    fits = [r for r in rows if "weibull/Transmission/k_median" in r]
    assert [r["trainer/step"] for r in fits] == [0, 30, 60]
    assert all(r["weibull/per_block/_type"] == "table-file" for r in fits)
    tables = [r for r in rows if "forces/per_tensor/_type" in r]
    assert [r["trainer/step"] for r in tables] == [30, 60]  # per-tensor detail is periodic, not every log step


def test_tensorboard_events_are_readable(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("loss")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [e.step for e in loss] == [m["step"] for m in metrics]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # TB stores fp32
    assert [e.step for e in acc.Scalars("weibull/Transmission/k_median")] == [0, 30, 60]


def test_requested_but_broken_sinks_raise_at_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(RuntimeError, match="logging.wandb_mode=offline"):  # unreachable server or no login
        WandbSink("p", directory=tmp_path, mode="online")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Exception):  # noqa: B017 - the OS error type varies; it must not pass silently
        TensorBoardSink(blocker / "tb")
    with pytest.raises(ValueError, match="not after the last written step"):
        sink = JsonlSink(tmp_path / "j")
        sink.log("metrics", {"loss": 1.0}, 10)
        sink.log("metrics", {"loss": 1.0}, 10)


class Broken:
    def __init__(self):
        self.calls = 0

    def log(self, kind, record, step):
        self.calls += 1
        if step >= 20:
            raise ConnectionError("server went away")

    def close(self):
        pass


def test_a_sink_that_drops_mid_run_is_reported_and_training_continues(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-2)
    broken = Broken()
    monitor = ForceMonitor(opt, model, [JsonlSink(tmp_path), broken], log_every=10)
    for step in range(1, 41):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.step(step, loss=0.0)
    monitor.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]
    assert broken.calls == 3  # metrics@10, forces@10, metrics@20 (raised) -> dropped
    assert "Broken" in monitor.sinks.failed and "server went away" in capsys.readouterr().err
    assert isinstance(monitor.sinks, FanOut)


def test_jsonl_flushes_each_record_and_fsyncs_at_marks_and_close(tmp_path, monkeypatch):
    """Default: every record readable at once (flushed: a killed process loses none), fsync'd when marks are taken
    (a checkpoint never points past the disk) and at close, not per record; fsync=True per record too; False
    never; anything else refused. (Counted: fsyncs of files; a new file's directory is fsync'd once as well.)"""
    import instrumented_adamw.sinks as sinks

    synced = []
    monkeypatch.setattr(sinks.os, "fsync", lambda fd: synced.append(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None)
    sink = JsonlSink(tmp_path / "default")
    sink.log("metrics", {"loss": 1.0}, 1)
    sink.log("forces", {"a": 1.0}, 1)
    sink.log("metrics", {"loss": 2.0}, 2)
    assert [r["step"] for r in read_jsonl(tmp_path / "default" / "metrics.jsonl")] == [1, 2] and synced == []
    marks = sink.marks()
    assert len(synced) == 2 and marks["metrics"]["bytes"] == (tmp_path / "default" / "metrics.jsonl").stat().st_size
    sink.close()
    assert len(synced) == 4
    synced.clear()
    every = JsonlSink(tmp_path / "every", fsync=True)
    for step in (1, 2, 3):
        every.log("metrics", {"loss": 1.0}, step)
    assert len(synced) == 3
    synced.clear()
    never = JsonlSink(tmp_path / "never", fsync=False)
    never.log("metrics", {"loss": 1.0}, 1)
    never.marks()
    never.close()
    assert synced == []
    for bad in ("always", 1, 0):
        with pytest.raises(ValueError, match="fsync must be"):
            JsonlSink(tmp_path / "bad", fsync=bad)


def test_monitor_sync_reaches_file_sinks_only(tmp_path, monkeypatch):
    import instrumented_adamw.sinks as sinks

    synced = []
    monkeypatch.setattr(sinks.os, "fsync", lambda fd: synced.append(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None)
    fan = FanOut([JsonlSink(tmp_path), sinks.NullSink()])  # a sink without sync is left alone
    fan.log("metrics", {"loss": 1.0}, 1)
    fan.sync()
    assert len(synced) == 1


def test_jsonl_resume_truncates_later_records(tmp_path):
    sink = JsonlSink(tmp_path)
    for step in (10, 20, 30):
        sink.log("metrics", {"loss": float(step)}, step)
    sink.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 40, "lo')  # torn line from a kill mid-write
    resumed = JsonlSink(tmp_path, resume_step=20)
    resumed.log("metrics", {"loss": 30.5}, 30)
    resumed.close()
    kept = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert kept == [(10, 10.0), (20, 20.0), (30, 30.5)]
    JsonlSink(tmp_path).log("metrics", {"loss": math.nan}, 40)  # NaN becomes null: strict JSON lines
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["loss"] is None


def test_report_figures_come_from_the_logs(run, tmp_path):
    result = make_report([run], tmp_path)
    names = sorted(p.name for p in result["files"])
    assert names == [
        "align_share.png",
        "closed_loop_all_sinks.png",
        "forces_all_sinks.png",
        "lambda_all_sinks.png",
        "report.html",
    ]
    for p in result["files"]:
        assert p.stat().st_size > 10_000, p
    page = (tmp_path / "report.html").read_text()  # headings in words, not file names
    assert "<h2>Force budget: alignment, injection, decay (all_sinks)</h2>" in page
    assert "<h2>Closed loop: λ predicted from the forces against the fits (all_sinks)</h2>" in page
    assert "<h2>forces_all_sinks</h2>" not in page
    metrics = read_jsonl(run / "metrics.jsonl")
    plotted = result["data"]["forces/all_sinks"]
    assert np.allclose(plotted["align_share"], [100 * m["Transmission/align_share"] for m in metrics], rtol=0)
    _, band = result["data"]["lambda/all_sinks"]
    fits = read_jsonl(run / "weibull.jsonl")
    assert list(band["step"]) == [0, 30, 60]
    assert band["k_max"][-1] == max(b["k"] for b in fits[-1]["blocks"] if b["cls"] == "Transmission")
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "paper" in page
    # A 60-step run is compared at the paper's fractions of training: paper step 2,500 (12.5%) -> step 7.5, whose
    # nearest record (logged every 10) is step 10; 250 and 1,250 fall before the first record and say so.
    rows = share_table(load_run(run))
    assert [r["paper_step"] for r in rows] == list(PAPER_BUDGET)
    assert [r["step"] for r in rows] == [None, None, 10, 10, 30, 60]
    assert all("no force record near step" in r["why"] for r in rows[:2])
    by_step = {m["step"]: m for m in metrics}
    for r in rows[2:]:
        assert r["ours"][0] == pytest.approx(100 * by_step[r["step"]]["Transmission/align_share"], rel=1e-12)


def test_report_peak_lambda_across_a_sweep(run, tmp_path):
    import shutil

    other = tmp_path / "lr_other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "resume", "wandb", "tensorboard"))
    cfg = (other / "config.yaml").read_text().replace("lr: 0.003", "lr: 0.001").replace("all_sinks", "lr_other")
    (other / "config.yaml").write_text(cfg)
    result = make_report([run, other], tmp_path / "out")
    assert "peak_lambda_vs_lr.png" in [p.name for p in result["files"]]
    assert set(result["data"]["peak_lambda"]) == {0.001, 0.003}


def test_hf_trainer_callback_attaches_the_monitor(tmp_path):
    from transformers import Trainer, TrainingArguments

    from instrumented_adamw.hf import ForceMonitorCallback

    model = tiny_model("gpt_neox")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (64, 16), generator=g)]
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, logging_steps=5, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[ForceMonitorCallback(weibull_every=10)])  # fmt: skip
    trainer.train()
    assert [r["step"] for r in read_jsonl(tmp_path / "forces" / "metrics.jsonl")] == [5, 10, 15, 20]
    assert [r["step"] for r in read_jsonl(tmp_path / "forces" / "weibull.jsonl")] == [10, 20]
    forces = read_jsonl(tmp_path / "forces" / "forces.jsonl")[-1]
    assert forces["classes"]["Transmission"]["steps"] == 5
    with pytest.raises(TypeError, match="InstrumentedAdamW"):
        Trainer(model=model, args=args, train_dataset=data, callbacks=[ForceMonitorCallback()]).train()


def test_monitor_step_logs_every_interval_of_a_long_loop(tmp_path):
    """A plain loop calling ForceMonitor.step every step: 26 logs at log_every=2, each covering exactly its own 2
    steps (a log skipped or doubled anywhere in the run fails), fits on multiples of weibull_every."""
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    monitor = ForceMonitor(opt, model, [JsonlSink(tmp_path)], log_every=2, weibull_every=20, per_tensor=False)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    returned = []
    for step in range(1, 53):
        model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
        record = monitor.step(step, loss=0.0)
        returned.append(record is not None)
    monitor.close()
    assert returned == [s % 2 == 0 for s in range(1, 53)]
    forces = read_jsonl(tmp_path / "forces.jsonl")
    assert [r["step"] for r in forces] == list(range(2, 53, 2))
    for r in forces:
        assert {c["steps"] for c in r["classes"].values()} == {2}, r["step"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(2, 53, 2))
    assert [r["step"] for r in read_jsonl(tmp_path / "weibull.jsonl")] == [20, 40]
