"""Analyses: spline recovery exact on cubic paths, equal to scipy; closed loop exact on real runs; robustness."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline

from instrumented_adamw.analysis import analyze as A
from instrumented_adamw.analysis.report import load_run
from train.config import load_config
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("k", [4, 5, 9])
def test_spline_basis_equals_scipy_not_a_knot(k):
    rng = np.random.default_rng(k)
    x = np.cumsum(rng.uniform(0.5, 2.0, size=k))
    y = rng.standard_normal((k, 6))
    t = np.linspace(x[0] - 0.3, x[-1] + 0.3, 41)
    ours = A.spline_basis(x, t) @ y
    ref = CubicSpline(x, y, bc_type="not-a-knot")(t)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_spline_basis_small_knot_counts_and_errors():
    x = np.array([0.0, 2.0, 5.0])
    y = 3 * x**2 - x + 1
    np.testing.assert_allclose(A.spline_basis(x, [1.0, 4.0]) @ y, [3.0, 45.0])  # the parabola itself
    np.testing.assert_allclose(A.spline_basis([0.0, 1.0], [0.25]) @ np.array([2.0, 6.0]), [3.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        A.spline_basis([0.0, 0.0, 1.0], [0.5])


def test_spline_recovery_is_exact_for_cubic_paths():
    # Every element follows a cubic in the step: W(t) = a + b t + c t² + d t³. The displacement identity then gives
    # the true F_a for any η, λ; the spline through sparse knots must reproduce it exactly (to float64 rounding).
    g = torch.Generator().manual_seed(0)
    coef = [torch.randn(300, 40, generator=g, dtype=torch.float64) * s for s in (1.0, 1e-2, 1e-4, 1e-6)]

    def w(t):
        return sum(c * float(t) ** i for i, c in enumerate(coef))

    knots = [0, 100, 200, 300, 400, 500]
    steps = [200, 300, 400, 500]
    lr = lambda s: 1e-3 * (1 + 0.5 * math.sin(s / 50))  # noqa: E731
    wd = lambda s: 0.01  # noqa: E731
    true = np.array([float(2 * ((w(t) - w(t - 1)) * w(t - 1)).sum() + 2 * lr(t - 1) * 0.01 * (w(t - 1) ** 2).sum())
                     for t in steps])  # fmt: skip
    rec = A.recover_alignment(knots, [w(k) for k in knots], steps, lr, wd, method="spline")
    np.testing.assert_allclose(rec, true, rtol=1e-9)
    naive = A.recover_alignment(knots, [w(k) for k in knots], steps, lr, wd, method="two_point")
    assert np.max(np.abs(naive / true - 1)) > 1e-3  # the baseline is not exact on curved paths


def test_lr_time_recovery_is_exact_for_paths_cubic_in_cumulative_lr():
    # Each step moves W by an amount ∝ η_t: paths cubic in u(t) = Σ_{r<t} η_r. The lr_time spline is exact on
    # them (the step-index spline is not, when η moves), so a wrong time axis or a shifted η index fails here.
    g = torch.Generator().manual_seed(1)
    coef = [torch.randn(200, 30, generator=g, dtype=torch.float64) * s for s in (1.0, 5.0, -20.0, 40.0)]
    lr = lambda s: 1e-3 * (1 + 0.8 * math.sin(s / 40))  # noqa: E731
    cum = A._cumulative_lr(lr, 600)

    def w(t):
        return sum(c * float(cum[t]) ** i for i, c in enumerate(coef))

    knots = [0, 100, 200, 300, 400, 500, 600]
    steps = [150, 250, 420, 600]
    wd = lambda s: 0.05 + 0.01 * (s % 3)  # noqa: E731 - λ_t varies too, and must be taken at t − 1
    true = np.array([float(2 * ((w(t) - w(t - 1)) * w(t - 1)).sum() + 2 * lr(t - 1) * wd(t - 1) * (w(t - 1) ** 2).sum())
                     for t in steps])  # fmt: skip
    ws = [w(k) for k in knots]
    rec = A.recover_alignment(knots, ws, steps, lr, wd, method="lr_time", cum_lr=lambda s: float(cum[s]))
    np.testing.assert_allclose(rec, true, rtol=1e-8)
    in_steps = A.recover_alignment(knots, ws, steps, lr, wd, method="spline")
    assert np.max(np.abs(in_steps / true - 1)) > 1e-4  # the step-index spline is not exact here


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"run.out_dir={tmp}", "run.name=an", f"data.cache_dir={tmp / 'cache'}", "data.synthetic_tokens=60000",
         "schedule.total_steps=200", "schedule.warmup_steps=20", "logging.weibull_every=20", "logging.eval_every=100",
         "logging.progress=false", "logging.report=false", "checkpoint.every=10", "checkpoint.resume_every=100",
         "checkpoint.early=[]", "checkpoint.save_optimizer=true"],
    )  # fmt: skip
    return train(cfg)


def test_closed_loop_with_exact_forces_reproduces_the_norm(run):
    exact = A.closed_loop(run, bridge="initial_ratio")
    assert exact["integration_error"] < 1e-6  # exact forces, integrated every step: rounding level
    assert exact["n_points"] == 6 * 10  # 6 Transmission matrices x fits at steps 20..200
    published = A.closed_loop(run, bridge="initial_ratio", bookkeeping="published")
    assert published["integration_error"] > 100 * exact["integration_error"]  # the +2·inject bookkeeping error
    for bridge in A.BRIDGES:
        res = A.closed_loop(run, bridge=bridge)
        assert math.isfinite(res["log_rmse"]) and res["bridge_error"] > 0
        # Exact integration: the total error is the bridge error.
        assert res["log_rmse"] == pytest.approx(res["bridge_error"], abs=1e-5)


def test_spline_validation_on_a_real_run(run):
    out = A.validate_spline(run, spacings=(10, 20, 40))
    for spacing in ("10", "20", "40"):
        summary = out["spacings"][spacing]
        assert set(summary) == set(A.SPLINE_METHODS)
        for m in A.SPLINE_METHODS:
            assert summary[m]["n"] > 0 and math.isfinite(summary[m]["median"])
    # Densest spacing: the spline beats the two-point baseline.
    s10 = out["spacings"]["10"]
    assert abs(s10["spline"]["median"] - 1) < abs(s10["two_point"]["median"] - 1)


def test_robustness_analyses(run):
    from safetensors.torch import load_file

    ckpt = run / "checkpoints" / "step_000200"
    weights = load_file(ckpt / "model.safetensors")
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    names = [n for g in opt_state["param_groups"] for n in g["param_names"]]
    state = opt_state["state"][names.index(name)]
    u = A.uhat_from_state(state, (0.9, 0.999), 1e-8)
    out = A.super_weight_shares(weights[name], u, lr=1e-4, weight_decay=0.1)
    assert out["removed"] == round(1e-3 * weights[name].numel())
    assert sum(out["all"]) == pytest.approx(100.0) and sum(out["without_top"]) == pytest.approx(100.0)
    w64, u64 = weights[name].double().numpy().ravel(), u.numpy().ravel()
    keep = np.argsort(np.abs(w64 * u64))[: -out["removed"]]  # independent: drop the largest |W·û| by sorting
    a, i, d = abs(2e-4 * (w64[keep] * u64[keep]).sum()), 1e-8 * (u64[keep] ** 2).sum(), 2e-5 * (w64[keep] ** 2).sum()
    assert out["without_top"] == pytest.approx((100 * a / (a + i + d), 100 * i / (a + i + d), 100 * d / (a + i + d)))
    assert out["without_top"] != out["all"]
    # RMS budget: each force over 2·RMS·numel·steps, recomputed from the per-tensor records (numel summed there).
    rms = A.rms_budget(run, cls="QKV")
    forces = load_run(run).forces
    assert list(rms["step"]) == [r["step"] for r in forces] and len(rms["step"]) == 20
    for i, rec in enumerate(forces):
        qkv = [t for t in rec["tensors"].values() if t["cls"] == "QKV"]
        numel = sum(t["numel"] for t in qkv)
        c = rec["classes"]["QKV"]
        for key in ("align", "inject", "decay"):
            want = sum(t[key] for t in qkv) / (2 * c["rms"] * numel * c["steps"])
            assert rms[key][i] == pytest.approx(want, rel=1e-9), (rec["step"], key)
    assert np.all(rms["inject"] > 0) and np.all(rms["decay"] < 0)
    # Depth ratio: median λ per layer from the last fits, deepest over shallowest.
    depth = A.depth_ratio(run)
    last = load_run(run).weibull[-1]
    per_layer = {}
    for b in last["blocks"]:
        if b["cls"] == "Transmission":
            per_layer.setdefault(b["layer"], []).append(b["lam"])
    medians = {layer: float(np.median(v)) for layer, v in per_layer.items()}
    assert depth["lam_per_layer"] == pytest.approx(medians, rel=1e-12)
    assert depth["deep_over_shallow"] == pytest.approx(medians[1] / medians[0], rel=1e-12)


def test_checkpoint_trajectory_from_local_hf_checkpoints(run):
    # Stand-ins for the published Pythia revisions: HF-format checkpoint directories of a real run.
    from instrumented_adamw.optim.schedules import warmup_cosine

    sources = {s: run / "checkpoints" / f"step_{s:06d}" for s in (0, 50, 100, 150, 200)}
    cfg = load_config(run / "config.yaml")
    lr = lambda s: warmup_cosine(s, cfg.optim.lr, 20, 200, 0.1)  # noqa: E731
    out = A.checkpoint_trajectory(sources, lr, lambda s: cfg.optim.weight_decay)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    traj = out["trajectories"][name]
    assert traj["step"] == [0, 50, 100, 150, 200] and len(traj["k"]) == 5
    fits = {r["step"]: r for r in load_run(run).weibull}
    logged = next(b for b in fits[100]["blocks"] if b["name"] == name)
    assert traj["lam"][2] == pytest.approx(logged["lam"], rel=1e-12)  # same protocol, same weights
    assert set(out["recovered_align"]) == set(A.SPLINE_METHODS)
    assert len(out["recovered_align"]["spline"][name]) == 4 and math.isfinite(out["bridge_log_rmse"])
    # Two-point baseline, recomputed: F_a(t) ≈ 2⟨W_a, (W_b − W_a)/(b − a)⟩ + 2η̄λ‖W_a‖² over each bracket [a, b].
    from safetensors.torch import load_file

    ws = {s: load_file(p / "model.safetensors")[name].double() for s, p in sources.items()}
    etas = [lr(s) for s in range(201)]
    for i, (a, b) in enumerate(zip([0, 50, 100, 150], [50, 100, 150, 200], strict=True)):
        eta = float(np.mean([(etas[s] + etas[s + 1]) / 2 for s in range(a, b - 1)]))
        want = 2 * ((ws[b] - ws[a]) / (b - a) * ws[a]).sum() + 2 * eta * cfg.optim.weight_decay * (ws[a] ** 2).sum()
        assert out["recovered_align"]["two_point"][name][i] == pytest.approx(float(want), rel=1e-9)
    # The bridge: λ predicted from each checkpoint's RMS at the first checkpoint's λ/RMS, against the fitted λ.
    lam, rms_ = np.array(traj["lam"]), np.array(traj["rms"])
    assert traj["rms"][0] == pytest.approx(float(ws[0].pow(2).mean().sqrt()), rel=1e-7)  # fp32-row reductions
    assert np.isfinite(lam).all() and out["bridge_log_rmse"] >= 0 and rms_[-1] > rms_[0]


def test_published_pythia_checkpoints_offline_error(monkeypatch):
    import huggingface_hub.constants

    from instrumented_adamw.optim.schedules import PYTHIA_WEIGHT_DECAY, pythia_lr
    from instrumented_adamw.weibull.diagnostics import HubUnavailableError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sources = A.pythia_checkpoints("EleutherAI/pythia-70m", steps=(1000, 2000, 4000))
    assert sources[2000] == ("EleutherAI/pythia-70m", "step2000")
    with pytest.raises(HubUnavailableError, match="revision step1000"):
        A.checkpoint_trajectory(sources, pythia_lr, lambda s: PYTHIA_WEIGHT_DECAY)
    assert pythia_lr(1429) == pytest.approx(1e-3) and pythia_lr(142_999) == pytest.approx(1e-4, rel=1e-6)


def test_analyze_command_writes_json_and_figures(run, tmp_path, capsys):
    import json

    from instrumented_adamw.cli import main

    assert main(["analyze", str(run), "--out", str(tmp_path), "--spacings", "20", "40"]) == 0
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert set(data["closed_loop"]) == {f"{b}/{k}" for b in A.BRIDGES for k in A.BOOKKEEPING}
    assert data["closed_loop"]["initial_ratio/exact"]["integration_error"] < 1e-6
    assert set(data["spline"]) == {"20", "40"} and data["depth"]["step"] == 200
    for f in ("closed_loop.png", "spline_recovery.png"):
        assert (tmp_path / f).stat().st_size > 10_000
    assert "closed_loop.png" in capsys.readouterr().out


def test_analyze_says_why_there_is_no_spline_and_draws_no_empty_figure(run, tmp_path, capsys):
    import json

    from instrumented_adamw.cli import main

    # Defaults (250/500/1000) on a 200-step run, and a spacing that divides too few checkpoint steps.
    for args, out in (([], tmp_path / "default"), (["--spacings", "13"], tmp_path / "thirteen")):
        assert main(["analyze", str(run), "--out", str(out), *args]) == 0
        data = json.loads((out / "analysis.json").read_text())
        assert "at least 3 checkpoints" in data["spline"]["skipped"] and "--spacings" in data["spline"]["skipped"]
        assert not (out / "spline_recovery.png").exists()
        assert "spline_recovery.png" not in capsys.readouterr().out


def test_analyze_prints_a_summary_table_and_json_on_request(run, tmp_path, capsys):
    import json

    from instrumented_adamw.cli import main

    assert main(["analyze", str(run), "--out", str(tmp_path), "--spacings", "20"]) == 0
    text = capsys.readouterr().out
    data = json.loads((tmp_path / "analysis.json").read_text())
    exact = data["closed_loop"]["initial_ratio/exact"]["log_rmse"]
    assert "closed loop (Transmission)" in text and f"initial_ratio    {exact:>9.4f}" in text
    assert "S =    20: spline" in text and "depth: deepest / shallowest layer median λ at step 200" in text
    assert main(["analyze", str(run), "--out", str(tmp_path), "--spacings", "20", "--json"]) == 0
    printed = capsys.readouterr().out
    raw = json.loads(printed[: printed.rindex("}") + 1])
    assert raw["closed_loop"]["initial_ratio/exact"]["log_rmse"] == pytest.approx(exact)


def test_the_commands_say_a_missing_path_does_not_exist_and_point_from_a_run_to_its_checkpoints(run, tmp_path, capsys):
    from instrumented_adamw.cli import main

    missing = str(tmp_path / "does_not_exist")
    for command in ("report", "analyze", "fit"):
        assert main([command, missing]) == 2
        assert f"{missing} does not exist" in capsys.readouterr().err
    assert main(["fit", str(run)]) == 2
    assert (
        f"{run} is a run directory; fit one of its checkpoints, e.g. {run}/checkpoints/step_" in capsys.readouterr().err
    )
