"""Analyses of run directories and checkpoints: closed-loop λ(t), spline force recovery, robustness checks.

* :func:`closed_loop` integrates the logged interval forces from ‖W‖²(0) and maps the predicted RMS to λ through
  a bridge, against the independently fitted λ(t); it splits the log error into bridge and integration parts.
* :func:`spline_basis` / :func:`recover_alignment` recover the alignment force from sparse checkpoints with the
  exact displacement identity F_a,t = 2⟨W_t, W_{t+1} − W_t⟩ + 2η_tλ_t‖W_t‖², through a per-element cubic spline
  (not-a-knot; evaluated as a weighted sum of checkpoints, so it runs on any device at any tensor size).
* :func:`validate_spline` scores the recovery against a run that logged every step's true forces.
* :func:`super_weight_shares`, :func:`rms_budget`, :func:`depth_ratio`: the papers' robustness analyses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instrumented_adamw.analysis.paper_numbers import PAPER_SPLINE_MEDIAN
from instrumented_adamw.analysis.plotting import colors, plt, save_figure
from instrumented_adamw.analysis.runs import RunLog, load_run
from instrumented_adamw.utils.extras import require

BRIDGES = ("gamma_fixed_k", "gamma_fitted_k", "initial_ratio")
BOOKKEEPING = ("exact", "published")


# ---------------------------------------------------------------------------------------------- closed loop
def _log_rmse(a: np.ndarray, b: np.ndarray) -> float:
    d = np.log(a) - np.log(b)
    d = d[np.isfinite(d)]
    return float(np.sqrt(np.mean(d * d))) if d.size else math.nan


def _tensor_logs(run: RunLog, cls: str) -> dict[str, dict[str, np.ndarray]]:
    """Per tensor of ``cls``: log steps, interval net force, inject, ‖W‖² now, numel, and ‖W‖² at step 0."""
    out: dict[str, dict[str, list]] = {}
    for rec in run.forces:
        for name, t in rec.get("tensors", {}).items():
            if t["cls"] != cls:
                continue
            if "numel" not in t:
                raise ValueError(f"{run.path}: forces.jsonl has no per-tensor numel (written before it was logged)")
            d = out.setdefault(name, dict(step=[], net=[], inject=[], w_sq=[], residual=[], numel=[]))
            d["step"].append(rec["step"])
            d["net"].append(t["align"] + t["inject"] + t["decay"] + t["higher_order"])
            d["inject"].append(t["inject"])
            d["w_sq"].append(t["w_sq_now"])
            d["residual"].append(t["residual"] or 0.0)
            d["numel"].append(t["numel"])
    if not out:
        raise ValueError(f"{run.path}: no per-tensor force records of class {cls} (logging.per_tensor=true?)")
    arrays = {}
    for name, d in out.items():
        a = {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}
        # ‖W‖² before the first interval: what it ended at, minus what the forces and rounding added.
        a["w_sq0"] = a["w_sq"][0] - a["net"][0] - a["residual"][0]
        arrays[name] = a
    return arrays


def _fits(run: RunLog, cls: str) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, list]] = {}
    for rec in run.weibull:
        for b in rec["blocks"]:
            if b["cls"] == cls:
                d = out.setdefault(b["name"], dict(step=[], lam=[], k=[], rms=[]))
                d["step"].append(rec["step"])
                d["lam"].append(b["lam"])
                d["k"].append(b["k"])
                d["rms"].append(b["rms"])
    return {n: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for n, d in out.items()}


def bridge_lambda(sigma: np.ndarray, bridge: str, k_fixed: float, k_t: np.ndarray, ratio0: float) -> np.ndarray:
    """σ (RMS) → λ: (a) Γ-bridge at a fixed k, (b) Γ-bridge at the fitted k(t), (c) the λ/RMS measured at init."""
    if bridge == "gamma_fixed_k":
        return sigma / math.sqrt(math.gamma(1 + 2 / k_fixed))
    if bridge == "gamma_fitted_k":
        return sigma / np.sqrt(np.array([math.gamma(1 + 2 / k) for k in k_t]))
    if bridge == "initial_ratio":
        return sigma * ratio0
    raise ValueError(f"bridge must be one of {BRIDGES}, got {bridge!r}")


def closed_loop(
    run: RunLog | str | Path, cls: str = "Transmission", bridge: str = "initial_ratio", bookkeeping: str = "exact"
) -> dict[str, Any]:
    """Predict λ(t) of every ``cls`` tensor from ‖W‖²(0) and the integrated forces alone; compare with the fits.

    ``bookkeeping="published"`` adds 2·inject per step: the error of pairing the post-update W with +η²‖û‖²
    (DESIGN.md), which the published analysis made. Returns the logRMSE (natural log) over every (tensor, fit step
    > 0), its ``bridge`` part (λ from the *observed* RMS vs fitted λ) and ``integration`` part (predicted vs
    observed RMS), and per-tensor trajectories.
    """
    run = run if isinstance(run, RunLog) else load_run(run)
    if bookkeeping not in BOOKKEEPING:
        raise ValueError(f"bookkeeping must be one of {BOOKKEEPING}, got {bookkeeping!r}")
    logs, fits = _tensor_logs(run, cls), _fits(run, cls)
    pred_all, fit_all, sig_pred_all, sig_obs_all, bridge_all = [], [], [], [], []
    per_tensor = {}
    for name, f in fits.items():
        if name not in logs or f["step"][0] != 0:
            continue  # needs the fit at initialisation (the trainer makes one)
        lg = logs[name]
        net = lg["net"] + (2.0 * lg["inject"] if bookkeeping == "published" else 0.0)
        w_sq_pred = lg["w_sq0"] + np.cumsum(net)
        numel = lg["numel"][0]
        at = {int(s): i for i, s in enumerate(lg["step"])}
        keep = [j for j, s in enumerate(f["step"]) if s > 0 and int(s) in at]
        if not keep:
            continue
        idx = np.array([at[int(f["step"][j])] for j in keep])
        sigma_pred = np.sqrt(np.maximum(w_sq_pred[idx], 0.0) / numel)
        sigma_obs = np.sqrt(lg["w_sq"][idx] / numel)
        k0, ratio0 = f["k"][0], f["lam"][0] / f["rms"][0]
        k_t = f["k"][keep]
        lam_pred = bridge_lambda(sigma_pred, bridge, k0, k_t, ratio0)
        lam_bridge = bridge_lambda(sigma_obs, bridge, k0, k_t, ratio0)
        lam_fit = f["lam"][keep]
        per_tensor[name] = dict(step=f["step"][keep], lam_fit=lam_fit, lam_pred=lam_pred, sigma_pred=sigma_pred,
                                sigma_obs=sigma_obs)  # fmt: skip
        pred_all.append(lam_pred)
        fit_all.append(lam_fit)
        sig_pred_all.append(sigma_pred)
        sig_obs_all.append(sigma_obs)
        bridge_all.append(lam_bridge)
    if not per_tensor:
        raise ValueError(f"{run.path}: no {cls} tensor has both a step-0 fit and force records at its fit steps")
    cat = np.concatenate
    return dict(
        cls=cls,
        bridge=bridge,
        bookkeeping=bookkeeping,
        log_rmse=_log_rmse(cat(pred_all), cat(fit_all)),
        bridge_error=_log_rmse(cat(bridge_all), cat(fit_all)),
        integration_error=_log_rmse(cat(sig_pred_all), cat(sig_obs_all)),
        n_points=int(sum(len(p) for p in pred_all)),
        tensors=per_tensor,
    )


# ---------------------------------------------------------------------------------------------- splines
def spline_basis(knots: Sequence[float], points: Sequence[float]) -> np.ndarray:
    """B[i, k]: weight of knot value k in the not-a-knot cubic spline through ``knots``, evaluated at point i.

    A cubic spline is linear in its knot values, so W(t) = Σ_k B[t, k]·W_k for every element of a tensor at
    once: the per-element spline costs one small float64 solve plus a weighted sum of checkpoints. Not-a-knot (the
    default of ``scipy.interpolate.CubicSpline``) reproduces polynomials of degree ≤ 3 exactly. Two knots give
    the straight line, three the parabola through them.
    """
    x = np.asarray(knots, dtype=np.float64)
    t = np.asarray(points, dtype=np.float64)
    n = x.size
    if n < 2 or np.any(np.diff(x) <= 0):
        raise ValueError(f"knots must be ≥ 2 strictly increasing values, got {x}")
    eye = np.eye(n)
    if n == 2:
        w = (t - x[0]) / (x[1] - x[0])
        return np.stack((1 - w, w), axis=1)
    if n == 3:
        # The unique parabola (not-a-knot with 3 knots): Lagrange weights.
        cols = []
        for k in range(3):
            others = [j for j in range(3) if j != k]
            cols.append(np.prod([(t - x[j]) / (x[k] - x[j]) for j in others], axis=0))
        return np.stack(cols, axis=1)
    h = np.diff(x)
    # Unknowns: second derivatives M_0..M_{n-1}; rows: continuity of the first derivative at interior knots,
    # plus not-a-knot (third derivative continuous at x_1 and x_{n-2}).
    a = np.zeros((n, n))
    rhs = np.zeros((n, n))  # rhs = R @ y, built column-wise for y = unit vectors
    for i in range(1, n - 1):
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1] / 6, (h[i - 1] + h[i]) / 3, h[i] / 6
        rhs[i] = (eye[i + 1] - eye[i]) / h[i] - (eye[i] - eye[i - 1]) / h[i - 1]
    a[0, 0], a[0, 1], a[0, 2] = h[1], -(h[0] + h[1]), h[0]
    a[n - 1, n - 3], a[n - 1, n - 2], a[n - 1, n - 1] = h[n - 2], -(h[n - 3] + h[n - 2]), h[n - 3]
    m = np.linalg.solve(a, rhs)  # [n knots' M] per unit knot value
    seg = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    x0, x1, hs = x[seg], x[seg + 1], h[seg]
    A, B = (x1 - t) / hs, (t - x0) / hs
    C, D = (A**3 - A) * hs * hs / 6, (B**3 - B) * hs * hs / 6
    return A[:, None] * eye[seg] + B[:, None] * eye[seg + 1] + C[:, None] * m[seg] + D[:, None] * m[seg + 1]


#: Columns of the checkpoint stack evaluated at once: K knots × 2^20 float64 ≈ 0.7 GB at K = 81.
SPLINE_CHUNK = 1 << 20


def _spline_inner_products(basis: np.ndarray, weights: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """For evaluation pairs (rows 2i, 2i+1 of ``basis``): ⟨W(t1) − W(t0), W(t0)⟩ and ‖W(t0)‖², in float64.

    W(t) = Σ_k basis[t, k]·W_k is evaluated for a block of columns of all checkpoints at once (one matmul), so
    the spline of every element of a full tensor costs K·(2T) multiply-adds per element.
    """
    flat = [w.reshape(-1) for w in weights]
    device = flat[0].device
    b = torch.from_numpy(basis).to(device=device, dtype=torch.float64)
    cross = torch.zeros(basis.shape[0] // 2, dtype=torch.float64, device=device)
    sq = torch.zeros_like(cross)
    for start in range(0, flat[0].numel(), SPLINE_CHUNK):
        stack = torch.stack([f[start : start + SPLINE_CHUNK].to(torch.float64) for f in flat])
        ev = b @ stack
        w0, w1 = ev[0::2], ev[1::2]
        cross += ((w1 - w0) * w0).sum(dim=1)
        sq += (w0 * w0).sum(dim=1)
    return cross.cpu().numpy(), sq.cpu().numpy()


def recover_alignment(
    knots: Sequence[int],
    weights: Sequence[Tensor],
    steps: Sequence[int],
    lr: Callable[[int], float],
    weight_decay: Callable[[int], float],
    method: str = "spline",
    cum_lr: Callable[[int], float] | None = None,
) -> np.ndarray:
    """Recovered F_a of the step t−1 → t for each t in ``steps``, from one tensor's checkpoints.

    ``knots`` are the checkpoint steps and ``weights`` the tensor at each. ``lr(s)`` / ``weight_decay(s)`` give η
    and the applied λ of 0-based step s (the step that moves W_s to W_s+1). Methods:

    * ``"spline"``: not-a-knot spline in the step index;
    * ``"lr_time"``: the same spline in cumulative-learning-rate time u(s) = Σ_{r<s} η_r (``cum_lr``), since each
      step's displacement scales with η_t: W is smoother in u than in t when the schedule moves;
    * ``"two_point"``: the naive baseline — the bracketing checkpoints a < t ≤ b, displacement (W_b − W_a)/(b − a)
      per step from W_a, and the trapezoid mean of η over [a, b].
    """
    knots = np.asarray(knots)
    if method in ("spline", "lr_time"):
        if method == "lr_time":
            if cum_lr is None:
                raise ValueError("method='lr_time' needs cum_lr")
            x = np.array([cum_lr(int(k)) for k in knots])
            pts = np.array([[cum_lr(t - 1), cum_lr(t)] for t in steps]).reshape(-1)
        else:
            x = knots.astype(np.float64)
            pts = np.array([[t - 1, t] for t in steps], dtype=np.float64).reshape(-1)
        cross, sq = _spline_inner_products(spline_basis(x, pts), weights)
        eta = np.array([lr(t - 1) for t in steps])
        lam = np.array([weight_decay(t - 1) for t in steps])
        return 2 * cross + 2 * eta * lam * sq
    if method == "two_point":
        out = []
        for t in steps:
            b = int(np.searchsorted(knots, t))  # first knot >= t
            if b == 0:
                raise ValueError(f"step {t} is not after the first checkpoint {knots[0]}")
            a = b - 1
            wa = weights[a].to(torch.float64).reshape(-1)
            disp = (weights[b].to(torch.float64).reshape(-1) - wa) / float(knots[b] - knots[a])
            etas = np.array([lr(s) for s in range(int(knots[a]), int(knots[b]))])
            eta = float(((etas[:-1] + etas[1:]) / 2).mean()) if len(etas) > 1 else float(etas[0])  # trapezoid
            out.append(float(2 * torch.dot(disp, wa) + 2 * eta * weight_decay(t - 1) * torch.dot(wa, wa)))
        return np.array(out)
    raise ValueError(f"method must be 'spline', 'lr_time' or 'two_point', got {method!r}")


SPLINE_METHODS = ("spline", "lr_time", "two_point")


def _load_snapshot(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    """Weights of a snapshot, verified against its ``manifest.json`` (sizes and SHA-256, written by the trainer)
    when it has one: a damaged checkpoint raises instead of feeding the analysis wrong numbers."""
    from instrumented_adamw.utils.durable_io import MANIFEST, verify_manifest

    load_file = require("safetensors.torch", "reading checkpoints").load_file

    if (path.parent / MANIFEST).is_file():
        problems = verify_manifest(path.parent)
        if problems:
            raise ValueError(f"{path.parent} is damaged: {'; '.join(problems)}")
    return load_file(str(path), device=str(device))


def _checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    out = {}
    for d in sorted((run_dir / "checkpoints").glob("step_*")):
        if (d / "model.safetensors").is_file():
            out[int(d.name.split("_")[1])] = d / "model.safetensors"
    return out


def validate_spline(
    run: RunLog | str | Path,
    spacings: Sequence[int] = (250, 500, 1000),
    cls: str = "Transmission",
    methods: Sequence[str] = SPLINE_METHODS,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Subsample a run's checkpoints to each spacing S, recover F_a at every interior checkpoint step of the
    subsample on **full tensors**, and compare with the true F_a logged at that step (``last_align``).

    Returns, per spacing and method, the median, interquartile range and fraction within ±10% of
    recovered/true over all (tensor, step) pairs of ``cls``.
    """
    run = run if isinstance(run, RunLog) else load_run(run)
    ckpts = _checkpoint_steps(run.path)
    truth: dict[tuple[str, int], float] = {}
    wd_at: dict[int, float] = {}  # applied λ of 0-based step s (lr_squared makes it vary), logged at s + 1
    for rec in run.forces:
        for name, t in rec.get("tensors", {}).items():
            if t["cls"] == cls and "last_align" in t:
                truth[(name, rec["step"])] = t["last_align"]
                wd_at[rec["step"] - 1] = t["last_weight_decay"]
    if not truth:
        raise ValueError(f"{run.path}: no per-tensor last-step force records of class {cls}")
    lr = _schedule_from_config(run)
    cum = _cumulative_lr(lr, max(ckpts))

    names = sorted({n for n, _ in truth})
    results: dict[str, Any] = {}
    loaded: dict[int, dict[str, Tensor]] = {}
    for spacing in spacings:
        knots = [s for s in sorted(ckpts) if s % spacing == 0]
        interior = [s for s in knots[1:] if any((n, s) in truth for n in names)]
        if len(knots) < 3 or not interior:
            results[str(spacing)] = dict(skipped=f"only {len(knots)} checkpoints at spacing {spacing}")
            continue
        for s in knots:
            if s not in loaded:
                loaded[s] = _load_snapshot(ckpts[s], device)
        ratios: dict[str, list[float]] = {m: [] for m in methods}
        for name in names:
            key = _state_key(name, loaded[knots[0]])
            ws = [loaded[s][key] for s in knots]
            steps = [s for s in interior if (name, s) in truth]
            true = np.array([truth[(name, s)] for s in steps])
            for m in methods:
                rec = recover_alignment(
                    knots, ws, steps, lr, wd_at.__getitem__, method=m, cum_lr=lambda s: float(cum[s])
                )
                ratios[m].extend((rec / true).tolist())
        results[str(spacing)] = {m: _ratio_summary(np.array(r)) for m, r in ratios.items()}
    return dict(cls=cls, spacings=results)


def _cumulative_lr(lr: Callable[[int], float], last_step: int) -> np.ndarray:
    """u[s] = Σ_{r<s} η_r for s = 0 … last_step + 1: the time axis of the ``lr_time`` spline."""
    return np.concatenate(([0.0], np.cumsum([lr(s) for s in range(last_step + 1)])))


def _ratio_summary(r: np.ndarray) -> dict[str, float]:
    r = r[np.isfinite(r)]
    q1, med, q3 = np.percentile(r, [25, 50, 75]) if r.size else (math.nan,) * 3
    return dict(median=float(med), q1=float(q1), q3=float(q3), within_10pct=float(np.mean(np.abs(r - 1) <= 0.1)),
                n=int(r.size))  # fmt: skip


def _state_key(name: str, state: Mapping[str, Tensor]) -> str:
    """The checkpoint key of a parameter name (transformers may save lm_head as embed_out and vice versa)."""
    if name in state:
        return name
    for a, b in (("lm_head.", "embed_out."), ("embed_out.", "lm_head.")):
        if name.startswith(a) and b + name[len(a) :] in state:
            return b + name[len(a) :]
    raise KeyError(f"{name} is not in the checkpoint (keys: {list(state)[:5]}...)")


def _schedule_from_config(run: RunLog) -> Callable[[int], float]:
    from instrumented_adamw.optim.schedules import warmup_cosine

    optim, sched = run.config.get("optim", {}), run.config.get("schedule", {})
    if not optim or not sched:
        raise ValueError(f"{run.path}: config.yaml lacks optim/schedule; cannot reconstruct η_t")
    return lambda s: warmup_cosine(s, optim["lr"], sched["warmup_steps"], sched["total_steps"],
                                   sched["min_lr_ratio"], sched.get("kind", "cosine"))  # fmt: skip


# ---------------------------------------------------------------------------------------------- robustness
def super_weight_shares(
    w: Tensor, u: Tensor, lr: float, weight_decay: float, fraction: float = 1e-3
) -> dict[str, tuple[float, float, float]]:
    """(align, inject, decay) shares of one step with all elements, and without the top ``fraction`` of elements
    by |W·û| (the "super weights"). The paper: 93.8 → 93.4 (0.4 points)."""
    w64, u64 = w.detach().reshape(-1).double(), u.detach().reshape(-1).double()
    if w64.shape != u64.shape:
        raise ValueError(f"W and û differ in size: {w64.numel()} vs {u64.numel()}")
    k = max(1, int(round(fraction * w64.numel())))
    keep = torch.ones_like(w64, dtype=torch.bool)
    keep[torch.topk((w64 * u64).abs(), k).indices] = False

    def shares(mask):
        a = abs(-2 * lr * float((w64[mask] * u64[mask]).sum()))
        i = lr * lr * float((u64[mask] ** 2).sum())
        d = 2 * lr * weight_decay * float((w64[mask] ** 2).sum())
        total = a + i + d
        return (100 * a / total, 100 * i / total, 100 * d / total)

    return dict(all=shares(torch.ones_like(keep)), without_top=shares(keep), removed=k)


def uhat_from_state(state: Mapping[str, Any], betas: tuple[float, float], eps: float, amsgrad: bool = False) -> Tensor:
    """û = m̂/(√v̂ + ε) of one parameter from its optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``)."""
    step = float(state["step"])
    m = state["exp_avg"].double() / (1 - betas[0] ** step)
    v = (state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]).double() / (1 - betas[1] ** step)
    return m / (v.sqrt() + eps)


def rms_budget(run: RunLog | str | Path, cls: str = "Selection") -> dict[str, np.ndarray]:
    """A class's forces in RMS units: each force's contribution to d(RMS)/step, F/(2·RMS·numel·steps).

    Δ‖W‖² = 2·RMS·numel·ΔRMS to first order, so dividing by 2·RMS·numel turns the squared-norm budget into how
    fast each force moves the RMS — comparable across matrices of different sizes (e.g. Q/K vs FFN).
    """
    run = run if isinstance(run, RunLog) else load_run(run)
    rows = [(r["step"], r["classes"][cls]) for r in run.forces if cls in r["classes"]]
    if not rows:
        raise ValueError(f"{run.path}: no {cls} force records")
    out: dict[str, list] = dict(step=[], rms=[], align=[], inject=[], decay=[])
    for step, c in rows:
        numel = c["w_sq_now"] / c["rms"] ** 2
        scale = 2 * c["rms"] * numel * max(c["steps"], 1)
        out["step"].append(step)
        out["rms"].append(c["rms"])
        for k in ("align", "inject", "decay"):
            out[k].append(c[k] / scale)
    return {k: np.asarray(v) for k, v in out.items()}


def depth_ratio(run: RunLog | str | Path, cls: str = "Transmission", step: int | None = None) -> dict[str, Any]:
    """Terminal (or ``step``'s) median λ per layer and the ratio deepest / shallowest layer."""
    run = run if isinstance(run, RunLog) else load_run(run)
    if not run.weibull:
        raise ValueError(f"{run.path}: no Weibull fits")
    rec = run.weibull[-1] if step is None else next(r for r in run.weibull if r["step"] == step)
    per_layer: dict[int, list[float]] = {}
    for b in rec["blocks"]:
        if b["cls"] == cls and b["layer"] is not None:
            per_layer.setdefault(b["layer"], []).append(b["lam"])
    if len(per_layer) < 2:
        raise ValueError(f"{run.path}: fewer than two layers with {cls} fits")
    lam = {layer: float(np.median(v)) for layer, v in sorted(per_layer.items())}
    layers = sorted(lam)
    return dict(step=rec["step"], lam_per_layer=lam, deep_over_shallow=lam[layers[-1]] / lam[layers[0]])


# ---------------------------------------------------------------------------------------------- published checkpoints
def checkpoint_trajectory(
    sources: Mapping[int, Any],
    lr: Callable[[int], float],
    weight_decay: Callable[[int], float],
    cls: str = "Transmission",
    methods: Sequence[str] = SPLINE_METHODS,
    trim: float = 0.1,
) -> dict[str, Any]:
    """k/λ trajectories and spline-recovered alignment from a series of checkpoints ``{step: source}``.

    A source is anything :func:`diagnostics.load_weights` takes (an HF directory, a safetensors file, a module,
    or a ``(hub_id, revision)`` pair). η_t and λ_t come from the schedule the checkpoints were trained with (for
    Pythia, :func:`schedules.pythia_lr` and wd 0.01). Also the bridge part of the closed loop: λ predicted from the
    observed RMS with the λ/RMS of the first checkpoint (integrating spline-derived forces reproduces the
    checkpoint norms by construction, so the bridge is the whole error here).
    """
    from instrumented_adamw.weibull.diagnostics import fit_blocks, load_weights

    steps = sorted(sources)
    if len(steps) < 3:
        raise ValueError(f"need at least 3 checkpoints, got {len(steps)}")
    weights, fits = {}, {}
    for s in steps:
        src = sources[s]
        w = load_weights(src[0], revision=src[1]) if isinstance(src, tuple) else load_weights(src)
        blocks = fit_blocks(w, trim=trim, classes=[cls])
        fits[s] = {b.name: b for b in blocks}
        weights[s] = {b.name: w.tensors[b.name] for b in blocks}
    names = sorted(set.intersection(*(set(f) for f in fits.values())))
    if not names:
        raise ValueError(f"no {cls} matrices common to all checkpoints")
    traj = {n: dict(step=steps, k=[fits[s][n].fit.k for s in steps], lam=[fits[s][n].fit.lam for s in steps],
                    rms=[fits[s][n].fit.rms for s in steps]) for n in names}  # fmt: skip
    cum = _cumulative_lr(lr, max(steps))
    recovered = {m: {} for m in methods}
    for n in names:
        ws = [weights[s][n] for s in steps]
        for m in methods:
            recovered[m][n] = recover_alignment(
                steps, ws, steps[1:], lr, weight_decay, method=m, cum_lr=lambda s: float(cum[s])
            ).tolist()
    lam_fit = np.array([traj[n]["lam"][1:] for n in names])
    rms = np.array([traj[n]["rms"][1:] for n in names])
    ratio0 = np.array([traj[n]["lam"][0] / traj[n]["rms"][0] for n in names])[:, None]
    bridge = _log_rmse((rms * ratio0).ravel(), lam_fit.ravel())
    return dict(cls=cls, steps=steps, trajectories=traj, recovered_align=recovered, bridge_log_rmse=bridge)


def pythia_checkpoints(model: str = "EleutherAI/pythia-70m", steps: Sequence[int] = (1000, 2000, 4000, 8000)):
    """Sources for :func:`checkpoint_trajectory` from the published Pythia revisions ``step<N>`` (hub)."""
    return {s: (model, f"step{s}") for s in steps}


# ---------------------------------------------------------------------------------------------- run directory
def analyze_run(run_dir: str | Path, out: str | Path | None = None, spacings: Sequence[int] | None = None,
                cls: str = "Transmission") -> dict[str, Any]:  # fmt: skip
    """Every analysis that the run directory supports, as JSON (``analysis.json``) plus figures."""
    import json

    run = load_run(run_dir)
    out = Path(out) if out is not None else run.path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = dict(run=str(run.path), cls=cls)
    loops = {}
    for bridge in BRIDGES:
        for book in BOOKKEEPING:
            res = closed_loop(run, cls, bridge, book)
            loops[f"{bridge}/{book}"] = {k: v for k, v in res.items() if k != "tensors"}
    result["closed_loop"] = loops
    ckpts = sorted(_checkpoint_steps(run.path))
    if spacings is None:
        spacings = [s for s in (250, 500, 1000) if sum(1 for c in ckpts if c % s == 0) >= 3]
        if not spacings:
            result["spline"] = dict(skipped=_spline_why(ckpts, (250, 500, 1000)))
    if spacings:
        result["spline"] = validate_spline(run, spacings, cls)["spacings"]
        if all("skipped" in v for v in result["spline"].values()):
            result["spline"] = dict(skipped=_spline_why(ckpts, spacings))
    try:
        result["depth"] = depth_ratio(run, cls)
    except ValueError as exc:
        result["depth"] = dict(skipped=str(exc))
    sel = [c for c in ("Selection", "QKV") if any(c in r["classes"] for r in run.forces)]
    result["rms_budget"] = {c: {k: v.tolist() for k, v in rms_budget(run, c).items()} for c in sel}
    (out / "analysis.json").write_text(json.dumps(result, indent=1, default=float))
    figure_closed_loop(run, out / "closed_loop.png", cls)
    files = [out / "analysis.json", out / "closed_loop.png"]
    if "skipped" not in result["spline"]:  # no empty figure: the JSON says why there is none
        figure_spline(result["spline"], out / "spline_recovery.png", cls)
        files.append(out / "spline_recovery.png")
    result["files"] = files
    return result


def _spline_why(ckpts: list[int], spacings: Sequence[int]) -> str:
    """Why spline recovery cannot run: it needs ≥ 3 numbered checkpoints at a spacing (a cubic through them)."""
    have = ", ".join(map(str, ckpts[:12])) + (" …" if len(ckpts) > 12 else "")
    return (
        f"spline recovery needs at least 3 checkpoints at one spacing; at spacings {list(spacings)} this run has "
        f"fewer (checkpoints at steps {have or 'none'}). Save more (checkpoint.every) or pass --spacings S with "
        "S dividing at least three checkpoint steps."
    )


def figure_closed_loop(run: RunLog, path: Path, cls: str = "Transmission") -> dict[str, Any]:
    pyplot = plt()
    exact = closed_loop(run, cls, "initial_ratio", "exact")
    pub = closed_loop(run, cls, "initial_ratio", "published")
    fig, ax = pyplot.subplots(figsize=(10, 6))
    tensors = exact["tensors"]
    for (name, d), c in zip(tensors.items(), colors(len(tensors)), strict=True):
        ax.plot(d["step"], d["lam_fit"], "o", color=c, ms=3, label=name.removesuffix(".weight"))
        ax.plot(d["step"], d["lam_pred"], "-", color=c, lw=1)
        ax.plot(d["step"], pub["tensors"][name]["lam_pred"], ":", color=c, lw=1)
    ax.plot([], [], "k-", label=f"predicted, exact bookkeeping (logRMSE {exact['log_rmse']:.4f})")
    ax.plot([], [], "k:", label=f"predicted, published bookkeeping (logRMSE {pub['log_rmse']:.4f})")
    ax.plot([], [], "ko", ms=3, label="fitted λ (one colour per matrix)")
    ax.set_xlabel("optimizer step\n(‖W‖² integrated from step 0 with the logged forces, turned into λ with each "
                  "matrix's λ/RMS ratio at step 0: the 'bridge')")  # fmt: skip
    ax.set_ylabel("Weibull scale λ (weight units)")
    ax.set_title(f"{run.name}: {cls} λ predicted from ‖W‖²(0) and the summed forces")
    ax.legend(fontsize=8, ncol=2 if len(tensors) > 8 else 1, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return dict(exact=exact, published=pub)


def figure_spline(summary: dict[str, Any], path: Path, cls: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(8, 4.5))
    spacings = [s for s in summary if "skipped" not in summary[s]]
    width = 0.8 / len(SPLINE_METHODS)
    for j, m in enumerate(SPLINE_METHODS):
        xs = np.arange(len(spacings)) + (j - 1) * width
        med = [summary[s][m]["median"] for s in spacings]
        lo = [summary[s][m]["median"] - summary[s][m]["q1"] for s in spacings]
        hi = [summary[s][m]["q3"] - summary[s][m]["median"] for s in spacings]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, label=f"{m} (median, IQR)")
    ax.axhline(1.0, color="k", lw=0.8)
    lo, hi = PAPER_SPLINE_MEDIAN
    ax.axhspan(lo, hi, color="grey", alpha=0.2, label=f"paper: spline median {lo}–{hi} (Pythia)")
    ax.set_xticks(np.arange(len(spacings)), [f"S = {s}" for s in spacings])
    ax.set_ylabel(f"recovered / true {cls} alignment")
    ax.set_title("spline displacement recovery from checkpoints, full tensors")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
