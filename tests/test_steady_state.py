"""Steady-state diagnostics: the equilibrium norm, T/τ, cos(W, û) on synthetic inputs with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.monitor import ForceMonitor, equilibrium_norm
from instrumented_adamw.sinks import JsonlSink, read_jsonl
from train.config import load_config
from train.loop import lr_at

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cos", [-0.3, -0.01, 0.0, 0.02, 0.5])
@pytest.mark.parametrize(("lr", "wd"), [(1e-3, 0.01), (0.1, 0.5), (3e-3, 0.2)])
def test_equilibrium_norm_is_a_fixed_point_of_the_exact_step(cos, lr, wd):
    u = 7.0
    r = equilibrium_norm(u, cos, lr, wd)
    w = np.array([r, 0.0])
    uhat = u * np.array([cos, math.sqrt(1 - cos * cos)])
    after = (1 - lr * wd) * w - lr * uhat
    assert after @ after == pytest.approx(w @ w, rel=1e-12)
    if cos == 0.0:
        assert r == pytest.approx(u * math.sqrt(lr / (2 * wd)), rel=lr * wd)  # the familiar √(η/2λ)·‖û‖
    assert math.isnan(equilibrium_norm(u, cos, lr, 0.0))


def _noise_training(steps, lr_fn, wd, schedule="lr", log_every=10, tmp=None, beta1=0.9):
    """A tensor whose gradients are pure noise (independent of W): the setting the η² correction assumes."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(0.02 * torch.randn(64, 64, dtype=torch.float64))
    opt = InstrumentedAdamW([("layers.0.mlp.down_proj.weight", w)], lr=lr_fn(0), weight_decay=wd,
                            betas=(beta1, 0.999), weight_decay_schedule=schedule)  # fmt: skip
    opt.param_groups[0]["initial_lr"] = lr_fn(0) if schedule == "lr" else max(lr_fn(s) for s in range(steps))
    monitor = ForceMonitor(opt, sinks=[JsonlSink(tmp)], log_every=log_every, model_type="llama")
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr_fn(step)
        w.grad = torch.randn_like(w)
        opt.step()
        monitor.step(step + 1)
    monitor.close()
    return read_jsonl(Path(tmp) / "metrics.jsonl")


def test_noise_gradients_settle_at_the_predicted_equilibrium(tmp_path):
    lr, wd = 0.05, 0.5  # τ = 1/(ηλ) = 40 steps; 600 steps = 15 τ
    # Without momentum û_t is independent of W_t: cos(W, û) ≈ 0 and both predictions hold.
    late = _noise_training(600, lambda s: lr, wd, tmp=tmp_path / "b0", beta1=0.0)[-20:]
    rms = np.mean([r["Transmission/rms"] for r in late])
    assert abs(np.mean([r["Transmission/cos_w_u"] for r in late])) < 0.05
    assert np.mean([r["Transmission/rms_eq_indep"] for r in late]) == pytest.approx(rms, rel=0.05)
    assert np.mean([r["Transmission/rms_eq"] for r in late]) == pytest.approx(rms, rel=0.05)
    # With momentum, W is built from recent, mutually correlated steps: cos(W, û) < 0 even for pure-noise
    # gradients, the balance with the measured cos still predicts the RMS, and the cos = 0 one falls short.
    records = _noise_training(600, lambda s: lr, wd, tmp=tmp_path / "b9", beta1=0.9)
    late = records[-20:]
    rms = np.mean([r["Transmission/rms"] for r in late])
    assert np.mean([r["Transmission/cos_w_u"] for r in late]) < -0.2
    assert np.mean([r["Transmission/rms_eq"] for r in late]) == pytest.approx(rms, rel=0.05)
    assert np.mean([r["Transmission/rms_eq_indep"] for r in late]) < 0.8 * rms
    # T/τ = Σ η λ = step · η · λ with constant settings.
    for r in records:
        assert r["Transmission/t_over_tau"] == pytest.approx(r["step"] * lr * wd, rel=1e-12)


def test_t_over_tau_follows_lr_squared_decay(tmp_path):
    peak, wd, steps = 0.02, 0.3, 200

    def lr_fn(s):
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))

    records = _noise_training(steps, lr_fn, wd, schedule="lr_squared", tmp=tmp_path)
    for r in records:
        expected = sum(lr_fn(s) * wd * lr_fn(s) / peak for s in range(r["step"]))
        assert r["Transmission/t_over_tau"] == pytest.approx(expected, rel=1e-12)


def test_lr_squared_configs_match_the_decay_budget():
    std = load_config(ROOT / "configs" / "pythia70m_wikitext103.yaml")
    sq = load_config(ROOT / "configs" / "pythia70m_lr_squared.yaml")
    matched = load_config(ROOT / "configs" / "pythia70m_lr_squared_matched.yaml")
    assert sq.optim.weight_decay_schedule == matched.optim.weight_decay_schedule == "lr_squared"
    assert sq.optim.weight_decay == std.optim.weight_decay and sq.optim.lr == std.optim.lr
    lrs = np.array([lr_at(s, std.optim.lr, std.schedule) for s in range(std.schedule.total_steps)])
    budget_std = (lrs * std.optim.weight_decay).sum()
    budget_matched = (lrs * matched.optim.weight_decay * lrs / std.optim.lr).sum()
    assert budget_std == pytest.approx(0.10991, rel=1e-4)
    assert budget_matched == pytest.approx(budget_std, rel=1e-4)
