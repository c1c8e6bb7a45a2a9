"""Compact logs for GPU evidence: per-tensor entries every N steps that still integrate every step, and logs read
back compressed (how ``results/`` stores committed runs)."""

from __future__ import annotations

import gzip
import lzma
import shutil

import pytest
import torch
from models import tiny_model

from instrumented_adamw import QUANTITIES, InstrumentedAdamW
from instrumented_adamw.analysis.analyze import closed_loop
from instrumented_adamw.analysis.runs import load_run
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.sinks import JsonlSink, read_jsonl
from train.config import ConfigError, load_config

STEPS, LOG_EVERY, TENSOR_EVERY = 24, 2, 6


def _train(monitor_kw: dict, out, stop_at: int | None = None):
    """A deterministic CPU loop; returns the monitor's state at ``stop_at`` (then a new monitor resumes it)."""
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)
    monitor = ForceMonitor(opt, model, [JsonlSink(out)], log_every=LOG_EVERY, weibull_every=TENSOR_EVERY, **monitor_kw)
    saved = None
    monitor.fit(0)  # the initial fit the closed loop starts from (as the trainer makes it)
    for s in range(1, STEPS + 1):
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(s, loss=float(s))
        if s == stop_at:
            saved = monitor.state_dict()
            monitor = ForceMonitor(opt, model, [JsonlSink(out)], log_every=LOG_EVERY, weibull_every=TENSOR_EVERY,
                                   **monitor_kw)  # fmt: skip
            monitor.load_state_dict(saved)
    monitor.close()
    return saved


@pytest.fixture(scope="module")
def twin_logs(tmp_path_factory):
    every, sparse, resumed = (tmp_path_factory.mktemp(n) for n in ("every", "sparse", "resumed"))
    _train({}, every)
    _train({"per_tensor_every": TENSOR_EVERY}, sparse)
    _train({"per_tensor_every": TENSOR_EVERY}, resumed, stop_at=8)  # mid-way between two per-tensor entries
    logs = {k: read_jsonl(v / "forces.jsonl") for k, v in (("every", every), ("sparse", sparse), ("resumed", resumed))}
    return dict(logs, dirs=(every, sparse))


def test_per_tensor_every_n_integrates_every_step_since_the_last_entry(twin_logs):
    every, sparse = twin_logs["every"], twin_logs["sparse"]
    assert [r["step"] for r in sparse] == [r["step"] for r in every]  # classes and layers still every log step
    for a, b in zip(every, sparse, strict=True):
        assert a["classes"] == b["classes"] and a["layers"] == b["layers"]
        assert ("tensors" in b) == (b["step"] % TENSOR_EVERY == 0)
    by_step = {r["step"]: r["tensors"] for r in every}
    for rec in (r for r in sparse if "tensors" in r):
        window = range(rec["step"] - TENSOR_EVERY + LOG_EVERY, rec["step"] + 1, LOG_EVERY)
        for name, t in rec["tensors"].items():
            parts = [by_step[s][name] for s in window]
            for q in (*QUANTITIES, "residual"):
                expect = sum(p[q] for p in parts) if q != "eta_lambda" else None
                if expect is not None:
                    assert t[q] == pytest.approx(expect, rel=1e-12, abs=1e-15), (rec["step"], name, q)
            assert t["steps"] == TENSOR_EVERY
            last = parts[-1]  # the read's own values: last step, ‖W‖² now
            assert {k: t[k] for k in t if k.startswith("last_")} == {k: last[k] for k in last if k.startswith("last_")}
            assert t["w_sq_now"] == last["w_sq_now"] and t["numel"] == last["numel"]
            assert t["align_share"] == pytest.approx(
                abs(t["align"]) / (abs(t["align"]) + t["inject"] + abs(t["decay"])), rel=1e-12
            )


def test_a_resumed_monitor_continues_the_pending_per_tensor_sums(twin_logs):
    sparse_tensors = [r.get("tensors") for r in twin_logs["sparse"]]
    resumed_tensors = [r.get("tensors") for r in twin_logs["resumed"]]
    for a, b in zip(sparse_tensors, resumed_tensors, strict=True):
        if a is None:
            assert b is None
            continue
        for name in a:
            for q in (*QUANTITIES, "steps", "residual"):
                assert b[name][q] == pytest.approx(a[name][q], rel=1e-12, abs=1e-15)


def test_closed_loop_is_the_same_from_sparse_per_tensor_records(twin_logs):
    every, sparse = (load_run(d) for d in twin_logs["dirs"])
    a, b = closed_loop(every, "Transmission"), closed_loop(sparse, "Transmission")
    assert b["n_points"] == a["n_points"] > 0  # fits every 6 steps, per-tensor entries every 6 steps
    assert b["log_rmse"] == pytest.approx(a["log_rmse"], rel=1e-9)
    assert b["integration_error"] == pytest.approx(a["integration_error"], abs=1e-9)


def test_compressed_logs_load_like_plain_ones(twin_logs, tmp_path):
    plain = twin_logs["dirs"][1]
    packed = tmp_path / "packed"
    packed.mkdir()
    for kind, compress in (("metrics", lzma.compress), ("forces", gzip.compress), ("weibull", lzma.compress)):
        suffix = ".xz" if compress is lzma.compress else ".gz"
        (packed / f"{kind}.jsonl{suffix}").write_bytes(compress((plain / f"{kind}.jsonl").read_bytes()))
    a, b = load_run(plain), load_run(packed)
    assert (a.metrics, a.forces, a.weibull) == (b.metrics, b.forces, b.weibull)
    shutil.rmtree(packed)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        load_run(packed.parent / "nothing")


def test_trainer_option_is_validated_against_the_log_fit_and_checkpoint_cadence():
    base = ["logging.log_every=10", "logging.weibull_every=250", "checkpoint.every=250", "checkpoint.resume_every=250"]
    cfg = load_config(None, [*base, "logging.per_tensor_every=250"])
    assert cfg.logging.per_tensor_every == 250
    for bad, message in (
        ("logging.per_tensor_every=25", "multiple of logging.log_every"),
        ("logging.per_tensor_every=500", "logging.weibull_every=250 must be a multiple of logging.per_tensor_every"),
        ("logging.per_tensor_every=-10", "must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, bad])
    with pytest.raises(ValueError, match="per_tensor_every must be >= 0"):
        model = tiny_model("gpt_neox")
        ForceMonitor(InstrumentedAdamW(model.named_parameters()), model, per_tensor_every=-1)
    assert load_config(None, [*base, "logging.per_tensor_every=0"]).logging.per_tensor_every == 0  # every log step
