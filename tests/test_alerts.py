"""Live diagnostics (instrumented_adamw.alerts): T/τ projected to the end of the schedule, and each alert on a
constructed run whose answer is known — raised when it should, once, not when it should not, and not again after a
resume."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.alerts import LiveDiagnostics, lr_at_from_scheduler
from instrumented_adamw.monitor import ForceMonitor, TrainingDiagnosticWarning

NAME = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"  # a Transmission matrix


def drive(grad, steps: int, *, lr=1e-3, wd=0.1, init=0.02, total_steps=None, lr_at=None, scheduler=None,
          log_every=5, seed=0, betas=(0.9, 0.999), **kw):  # fmt: skip
    """AdamW on one 32×32 matrix with gradient ``grad(step, w)``; the monitor reads every ``log_every`` steps.
    Returns the readings and the monitor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(init * torch.randn(32, 32, generator=g))
    opt = InstrumentedAdamW([(NAME, w)], lr=lr, weight_decay=wd, betas=betas)
    sched = scheduler(opt) if scheduler is not None else None
    if lr_at == "scheduler":
        lr_at = lr_at_from_scheduler(sched)
    monitor = ForceMonitor(opt, model_type="gpt_neox", log_every=log_every, total_steps=total_steps, lr_at=lr_at, **kw)
    readings = []
    for step in range(1, steps + 1):
        w.grad = grad(step, w.detach(), g)
        opt.step()
        if sched is not None:
            sched.step()
        if step % log_every == 0:
            readings.append(monitor.read(step))
    return readings, monitor


def kinds(readings) -> list[tuple[int, str]]:
    return [(r.step, a.kind) for r in readings for a in r.alerts]


def noise(step, w, g):
    return torch.randn(w.shape, generator=g)


# ------------------------------------------------------------------------------------------------ projection
def test_t_over_tau_end_at_constant_lr_is_total_steps_times_eta_lambda():
    readings, _ = drive(noise, 20, lr=1e-3, wd=0.1, total_steps=1000)
    for r in readings:
        assert r.metrics["Transmission/t_over_tau_end"] == pytest.approx(1000 * 1e-3 * 0.1, rel=1e-9)
        assert r.metrics["Transmission/tau_frac"] == pytest.approx(1 / (1e-3 * 0.1) / 1000, rel=1e-9)
        assert r.metrics["Transmission/t_over_tau"] == pytest.approx(r.step * 1e-4, rel=1e-9)
        assert r.forces["layers"]["0"]["t_over_tau_end"] == pytest.approx(0.1, rel=1e-9)  # per layer too


def test_t_over_tau_end_follows_the_schedule():
    """A linear decay to 0 over 1000 steps (a LambdaLR, read as the HF callback reads it): from any read,
    T/τ_end = λ·Σ_t η_t over the whole schedule."""
    total, peak, wd = 1000, 1e-3, 0.1

    def linear(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)

    readings, _ = drive(noise, 40, lr=peak, wd=wd, total_steps=total, scheduler=linear, lr_at="scheduler",
                        log_every=10)  # fmt: skip
    whole = sum(peak * (1 - (t - 1) / total) * wd for t in range(1, total + 1))
    for r in readings:
        assert r.metrics["Transmission/t_over_tau_end"] == pytest.approx(whole, rel=1e-9)
        so_far = sum(peak * (1 - (t - 1) / total) * wd for t in range(1, r.step + 1))
        assert r.metrics["Transmission/t_over_tau"] == pytest.approx(so_far, rel=1e-9)


def test_no_total_steps_no_projection():
    readings, _ = drive(noise, 10)
    assert "Transmission/t_over_tau_end" not in readings[-1].metrics
    assert not any(a.kind == "decay_cannot_balance" for r in readings for a in r.alerts)


# ------------------------------------------------------------------------------------------------ alerts
def test_decay_that_cannot_balance_is_flagged_with_the_factor():
    """λ·Σ η = 0.01·1e-3·1000 = 0.01: a hundred times short of one timescale."""
    readings, _ = drive(noise, 20, lr=1e-3, wd=0.01, total_steps=1000)
    alerts = [a for r in readings for a in r.alerts if a.kind == "decay_cannot_balance"]
    # without lr_at the projection holds the current lr, so it waits for the lr to hold between two reads
    assert len(alerts) == 1 and alerts[0].step == 10 and alerts[0].group == "Transmission"
    assert "projected at 0.01" in alerts[0].message and "about 100×" in alerts[0].message
    good, _ = drive(noise, 20, lr=1e-3, wd=1.0, total_steps=2000)  # T/τ_end = 2
    assert not any(a.kind == "decay_cannot_balance" for r in good for a in r.alerts)


def test_a_warmup_without_lr_at_raises_nothing_until_the_lr_holds():
    """A 100-step warmup from a tiny lr, the schedule unknown to the monitor: its low projections and low update
    ratios are the warmup's, not the run's; once the lr holds, the projection counts."""

    def warmup(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))

    watched = {"decay_cannot_balance", "update_ratio_low"}
    readings, _ = drive(noise, 100, lr=1e-3, wd=0.01, init=1.0, total_steps=1000, scheduler=warmup)
    assert readings[0].metrics["Transmission/update_weight_ratio"] < 1e-4  # what the rule would have flagged
    assert not watched & {k for _, k in kinds(readings)}
    more, _ = drive(noise, 110, lr=1e-3, wd=0.01, init=1.0, total_steps=1000, scheduler=warmup)
    assert [(s, k) for s, k in kinds(more) if k in watched] == [(105, "decay_cannot_balance")]  # lr held 100-105


def test_overshoot_then_relax_is_recognised():
    """A gradient that pushes the weights outward for 100 steps, then none: the norm rises, peaks when the push
    stops (momentum carries it a few steps more) and decays towards an equilibrium far below."""
    direction = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))

    def push_then_stop(step, w, g):
        return -direction if step <= 100 else torch.zeros_like(w)

    readings, monitor = drive(push_then_stop, 200, lr=1e-2, wd=0.5)
    found = [(s, k) for s, k in kinds(readings) if k == "overshoot_relaxing"]
    assert len(found) == 1 and 100 < found[0][0] <= 130
    peak_step = monitor.diagnostics.history["Transmission"]["peak_rms_step"]
    assert 100 <= peak_step <= 115
    steady, _ = drive(noise, 200, lr=1e-3, wd=0.1)  # a random walk from init: no peak and relax
    assert "overshoot_relaxing" not in [k for _, k in kinds(steady)]


def test_align_collapse_is_flagged():
    """Gradients along the weights (the align share near 1), then pure noise independent of them: without momentum
    (β1 = 0) each step is independent of the weights, ⟨W, û⟩ averages out and the share falls near 0. (With
    momentum a random walk keeps a high align share: W holds the last steps, which û correlates with.)"""

    def along_then_noise(step, w, g):
        return w.clone() if step <= 50 else torch.randn(w.shape, generator=g)

    readings, _ = drive(along_then_noise, 120, lr=1e-3, wd=0.0, betas=(0.0, 0.999))
    found = [(s, k) for s, k in kinds(readings) if k == "align_collapse"]
    assert len(found) == 1 and 50 < found[0][0] <= 80
    assert readings[5].metrics["Transmission/align_share"] > 0.9


def test_update_ratio_out_of_band_both_ways():
    high, _ = drive(noise, 10, lr=0.5, init=0.02)  # steps of 0.5 per element on weights of 0.02
    assert "update_ratio_high" in [k for _, k in kinds(high)]
    assert high[0].metrics["Transmission/update_weight_ratio"] > 0.1
    low, _ = drive(noise, 10, lr=1e-7, init=1.0)
    assert "update_ratio_low" in [k for _, k in kinds(low)]
    usual, _ = drive(noise, 10, lr=1e-3, init=0.02)  # ratio 0.05
    assert not {"update_ratio_high", "update_ratio_low"} & {k for _, k in kinds(usual)}


def test_each_alert_once_also_across_a_resume():
    readings, monitor = drive(noise, 30, lr=0.5, init=0.02, total_steps=100000, wd=1e-6)
    assert sorted({k for _, k in kinds(readings)}) == ["decay_cannot_balance", "update_ratio_high"]
    assert len(kinds(readings)) == 2
    _, resumed = drive(noise, 10, lr=0.5, init=0.02, total_steps=100000, wd=1e-6)
    fresh = LiveDiagnostics(100000)
    fresh.load_state_dict(monitor.diagnostics.state_dict())
    resumed.diagnostics = fresh
    assert resumed.read(40).alerts == []


def test_alerts_reach_the_console_once_and_the_metrics_record(tmp_path):
    from instrumented_adamw.sinks import JsonlSink, read_jsonl

    w = torch.nn.Parameter(0.02 * torch.randn(32, 32))
    opt = InstrumentedAdamW([(NAME, w)], lr=0.5, weight_decay=0.1)
    monitor = ForceMonitor(opt, model_type="gpt_neox", sinks=[JsonlSink(tmp_path)], log_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 4):
            w.grad = torch.randn(32, 32)
            opt.step()
            monitor.step(step)
    told = [c for c in caught if issubclass(c.category, TrainingDiagnosticWarning)]
    assert (
        len(told) == 1
        and "update_ratio_high" not in str(told[0].message)
        and "lr is likely too high" in str(told[0].message)
    )
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [len(r.get("alerts", [])) for r in records] == [1, 0, 0]
    assert records[0]["alerts"][0]["kind"] == "update_ratio_high" and math.isfinite(records[1]["Transmission/rms"])


def test_diagnostics_can_be_switched_off():
    readings, monitor = drive(noise, 10, lr=0.5, diagnostics=False)
    assert monitor.diagnostics is None and kinds(readings) == []


def test_lr_at_reads_a_lambda_lr_through_framework_wrappers():
    """accelerate's AcceleratedScheduler and DeepSpeed's wrappers keep the scheduler inside: read through them;
    anything else (no lr_lambdas) gives no lr_at, and the projection holds the current lr."""
    from types import SimpleNamespace

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for wrapped in (
        sched,
        SimpleNamespace(scheduler=sched),
        SimpleNamespace(scheduler=SimpleNamespace(lr_scheduler=sched)),
    ):
        lr_at = lr_at_from_scheduler(wrapped)
        assert lr_at(1) == 0.5 and lr_at(4) == pytest.approx(0.125)  # step t runs at the scheduler's (t-1)-th lr
    assert lr_at_from_scheduler(torch.optim.lr_scheduler.StepLR(opt, 10)) is None
