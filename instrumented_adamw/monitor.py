"""``ForceMonitor``: two lines in any training loop turn the optimizer's force tables into logged records.

    monitor = ForceMonitor(opt, model, sinks=[JsonlSink(run_dir)], log_every=10, weibull_every=250)
    ...
    opt.step()
    monitor.step(step, loss=loss)    # after the optimizer step; does nothing between log steps

On a log step it reads the interval-integrated forces (one device→host transfer), aggregates them per class
(Transmission / Selection / QKV / V / Other / unclassified), per layer and per tensor, and writes:

* ``metrics``: flat scalars — whatever the caller passes (``loss``, ``lr``, ...) plus, per class,
  ``<cls>/align_share``, ``<cls>/inject_share``, ``<cls>/decay_share`` (paper definition
  ``|ΣF_a| / (|ΣF_a| + ΣF_i + Σ|F_d|)`` over the interval), ``<cls>/rms``, ``<cls>/net`` (Σ of all four forces),
  ``<cls>/cos_w_u`` (cos(W, û) of the last step), ``<cls>/rel_residual`` (closure residual over the budget),
  and the steady-state diagnostics ``<cls>/rms_eq`` / ``<cls>/rms_eq_indep`` (the RMS at which the interval's
  step statistics would hold ‖W‖² still, with the measured cos(W, û) and with cos = 0; see
  :func:`equilibrium_norm`) and ``<cls>/t_over_tau`` (cumulative Σ η_t λ_t, the training-budget axis);
* ``forces``: the same per class, per layer and (``per_tensor=True``) per tensor, with the raw interval sums;
  per tensor also ``numel`` and the last step's values (``last_align``, ``last_lr``, ...: the ground truth that
  spline recovery from checkpoints is validated against). ``per_tensor_every=N`` writes the per-tensor entries
  only on steps that are multiples of N, each integrating every step since the previous per-tensor entry (a
  20k-step run then logs classes and layers every 10 steps but its 76 tensors every 250: 12× less log);
* ``weibull`` (every ``weibull_every`` steps): per-block fits of every tracked weight matrix, and per-class
  medians of k and λ in ``metrics``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instrumented_adamw.alerts import Alert, LiveDiagnostics
from instrumented_adamw.optim.forces import LAST_KEYS, QUANTITIES, ForceReadout
from instrumented_adamw.optim.tracking import ForceTracking, unwrap_optimizer
from instrumented_adamw.sinks import FanOut, Sink
from instrumented_adamw.taxonomy import classify_all
from instrumented_adamw.weibull.fit import fit_weibull

_COL = {q: i for i, q in enumerate(QUANTITIES)}
_LR, _WD, _ULR = LAST_KEYS.index("lr"), LAST_KEYS.index("weight_decay"), LAST_KEYS.index("update_lr")
_INJECT = LAST_KEYS.index("inject")
#: Per-class keys of the flat ``metrics`` records (``<class>/<key>``).
METRIC_KEYS = (
    "align_share",
    "inject_share",
    "decay_share",
    "rms",
    "net",
    "cos_w_u",
    "rel_residual",
    "rms_eq",
    "rms_eq_indep",
    "t_over_tau",
    "nonfinite_steps",
    "update_norm",
    "weight_norm",
    "update_weight_ratio",
    "tau_iter",
    "rms_over_eq",
)


def shares(align: float, inject: float, decay: float) -> tuple[float, float, float]:
    """(align, inject, decay) shares of the budget ``|F_a| + F_i + |F_d|`` (NaN when the budget is zero)."""
    total = abs(align) + abs(inject) + abs(decay)
    if total == 0:
        return math.nan, math.nan, math.nan
    return abs(align) / total, abs(inject) / total, abs(decay) / total


def equilibrium_norm(
    u_norm: float, cos: float, lr: float, weight_decay: float, update_lr: float | None = None
) -> float:
    """‖W‖ at which one step leaves ‖W‖² unchanged, for a step direction of norm ‖u‖ at angle cos(W, u).

    Solves ‖(1 − ηλ)W − η_u·u‖² = ‖W‖² exactly (higher-order terms included), η_u the update's step size (AdamW:
    η; Muon: the shape-adjusted lr): a‖W‖² + b‖W‖ − d = 0 with a = ηλ(2 − ηλ), b = 2η_u(1 − ηλ)·cos·‖u‖,
    d = η_u²‖u‖². With cos = 0 (updates independent of the weights, the assumption behind decay ∝ η²) and η_u = η
    this is ‖u‖·√(η/(λ(2 − ηλ))) ≈ ‖u‖√(η/2λ). NaN without decay (no equilibrium).
    """
    eta_u = lr if update_lr is None else update_lr
    a = lr * weight_decay * (2.0 - lr * weight_decay)
    if not a > 0 or not math.isfinite(u_norm * cos):
        return math.nan
    b = 2.0 * eta_u * (1.0 - lr * weight_decay) * cos * u_norm
    d = eta_u * eta_u * u_norm * u_norm
    return (-b + math.sqrt(b * b + 4.0 * a * d)) / (2.0 * a)


def aggregate(readout: ForceReadout, rows: np.ndarray, numel: np.ndarray) -> dict[str, float]:
    """Interval totals of a set of tensors (``rows`` of the read-out) and the derived shares, RMS and residual,
    and the steady-state diagnostics: cos(W, û), the equilibrium RMS the current step statistics imply (with the
    measured cos, and with cos = 0), and the interval's decay budget Σ η_t λ_t (mean over the tensors)."""
    return aggregate_groups(readout, [rows], numel)[0]


#: Per-tensor columns that aggregate_groups sums, after the interval quantities: ‖W‖² now, the last step's
#: ⟨W,û⟩, ‖û‖², ‖W‖², the element count, ‖û‖² per step, the residual (NaN as 0), |residual|, the last lr, λ, η_u,
#: and the last step's inject η_u²‖û‖² (the squared norm of the step it applied).
_EXTRA = ("w_now", "last_wu", "last_uu", "last_ww", "numel", "u_per_step", "res", "abs_res", "lr", "wd", "ulr",
          "last_inject")  # fmt: skip
_X = {name: len(QUANTITIES) + i for i, name in enumerate(_EXTRA)}


#: Per-layer values :meth:`Reading.logger_metrics` sends to framework loggers.
LOGGER_LAYER_KEYS = ("align_share", "inject_share", "decay_share", "net")


def composer_metrics(readout: ForceReadout) -> dict[str, float]:
    """Each tensor's last step in Composer's ``OptimizerMonitor`` key scheme: the update's norm η_u‖û‖ (the step the
    optimizer applied, decay aside), the parameter's norm ‖W‖ (now) and their ratio."""
    update = np.sqrt(readout.last[:, _INJECT])
    param = np.sqrt(readout.w_sq_now)
    ratio = np.divide(update, param, out=np.full_like(update, np.nan), where=param > 0)
    out: dict[str, float] = {}
    for name, u, w, r in zip(readout.names, update.tolist(), param.tolist(), ratio.tolist(), strict=True):
        out[f"l2_norm/update/{name}"] = u
        out[f"l2_norm/param/{name}"] = w
        out[f"l2_norm_ratio/update_param/{name}"] = r
    return out


def aggregate_groups(readout: ForceReadout, groups: list[np.ndarray], numel: np.ndarray) -> list[dict[str, float]]:
    """:func:`aggregate` of several sets of tensors at once (a log's classes and layers, or every tensor): one
    gather and one ``reduceat`` per statistic for all of them, rather than some thirty numpy calls per set, which
    made the aggregation most of a log's host time."""
    if not groups:
        return []
    sizes = np.array([len(rows) for rows in groups], dtype=np.int64)
    full = sizes > 0
    idx = np.concatenate([np.asarray(rows, dtype=np.int64) for rows in groups])
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))[full]
    residual = readout.residual[idx]
    known = np.where(np.isnan(residual), 0.0, residual)  # nansum
    steps = np.maximum(readout.steps[idx], 1)
    cols = np.column_stack((readout.interval[idx], readout.w_sq_now[idx], readout.last[idx, :3], numel[idx],
                            readout.interval[idx, _COL["u_sq"]] / steps, known, np.abs(known),
                            readout.last[idx][:, [_LR, _WD, _ULR, _INJECT]]))  # fmt: skip
    counts = np.column_stack((readout.steps[idx], readout.nonfinite_steps[idx], readout.unmeasured_steps[idx]))
    sums = np.zeros((len(groups), cols.shape[1]))
    top = np.zeros((len(groups), 3), dtype=np.int64)
    if idx.size:
        sums[full] = np.add.reduceat(cols, starts, axis=0)
        top[full] = np.maximum.reduceat(counts, starts, axis=0)
    out = []
    for size, s, (max_steps, max_nonfinite, max_unmeasured) in zip(sizes.tolist(), sums.tolist(), top.tolist(),
                                                                     strict=True):  # fmt: skip
        entry = {q: s[_COL[q]] for q in QUANTITIES}
        entry["eta_lambda"] = s[_COL["eta_lambda"]] / size if size else 0.0  # a per-step rate: the mean, not the sum
        a, i, d = shares(entry["align"], entry["inject"], entry["decay"])
        budget = abs(entry["align"]) + entry["inject"] + abs(entry["decay"])
        wu, uu, ww, n_el = s[_X["last_wu"]], s[_X["last_uu"]], s[_X["last_ww"]], s[_X["numel"]]
        w_sq, u_sq = entry["w_sq"], entry["u_sq"]
        cos_interval = entry["w_dot_u"] / math.sqrt(w_sq * u_sq) if w_sq * u_sq > 0 else math.nan
        lr, wd, ulr = (s[_X["lr"]] / size, s[_X["wd"]] / size, s[_X["ulr"]] / size) if size else (math.nan,) * 3
        # Steps that moved W unmeasured (track_every > 1) leave the books open: no residual rather than a wrong one.
        closes = max_unmeasured == 0
        u_norm = math.sqrt(s[_X["u_per_step"]])  # interval-mean ‖û‖
        rms = math.sqrt(s[_X["w_now"]] / n_el) if n_el else math.nan
        rms_eq = equilibrium_norm(u_norm, cos_interval, lr, wd, ulr) / math.sqrt(n_el) if n_el else math.nan
        entry.update(
            cos_w_u_interval=cos_interval,
            rms_eq=rms_eq,
            rms_eq_indep=equilibrium_norm(u_norm, 0.0, lr, wd, ulr) / math.sqrt(n_el) if n_el else math.nan,
            align_share=a,
            inject_share=i,
            decay_share=d,
            net=entry["align"] + entry["inject"] + entry["decay"] + entry["higher_order"],
            w_sq_now=s[_X["w_now"]],
            rms=rms,
            # Decoupled decay makes W an average over τ = 1/(ηλ) steps (the last step's η and λ); how far the RMS
            # is from the equilibrium the interval's forces imply (1: there).
            tau_iter=1.0 / (lr * wd) if lr * wd > 0 else math.nan,
            rms_over_eq=rms / rms_eq if rms_eq > 0 else math.nan,
            # The last step's size η_u‖û‖ against ‖W‖ (over a set: the norms of the concatenated tensors).
            update_norm=math.sqrt(s[_X["last_inject"]]),
            weight_norm=math.sqrt(s[_X["w_now"]]),
            update_weight_ratio=math.sqrt(s[_X["last_inject"]] / s[_X["w_now"]]) if s[_X["w_now"]] > 0 else math.nan,
            last_lr=lr,
            last_weight_decay=wd,
            cos_w_u=wu / math.sqrt(uu * ww) if uu > 0 and ww > 0 else math.nan,
            residual=s[_X["res"]] if closes else math.nan,
            rel_residual=s[_X["abs_res"]] / budget if budget > 0 and closes else math.nan,
            steps=max_steps,
            nonfinite_steps=max_nonfinite,
            unmeasured_steps=max_unmeasured,
        )
        out.append(entry)
    return out


def _all_steps(agg: dict[str, float]) -> float:
    """The interval's Σ η_t λ_t over every step it spans: with ``track_every`` > 1 the measured steps' sum scaled
    by all steps over measured ones (η and λ of the unmeasured steps are not recorded)."""
    measured, unmeasured = agg["steps"], agg["unmeasured_steps"]
    if not unmeasured:
        return agg["eta_lambda"]
    return agg["eta_lambda"] * (measured + unmeasured) / measured if measured else 0.0


def _to_console(alerts: list[Alert]) -> None:
    """Each alert once on stderr, from rank 0 only (every rank reads and would raise the same)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    for alert in alerts:
        warnings.warn(f"[instrumented-adamw] step {alert.step}: {alert.message}", TrainingDiagnosticWarning,
                      stacklevel=3)  # fmt: skip


class TrainingDiagnosticWarning(UserWarning):
    """A live diagnostic of the run (``instrumented_adamw.alerts``): filter or escalate with ``warnings``."""


def as_tracked(optimizer):
    """What the monitor reads: an instrumented optimizer (unwrapped from accelerate & co), a HybridOptimizer, or a
    list of optimizers made into one; None if none of them is instrumented."""
    from instrumented_adamw.optim.hybrid import HybridOptimizer

    if isinstance(optimizer, (list, tuple)):
        optimizer = HybridOptimizer(optimizer)
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, ForceTracking):
        return inner
    if isinstance(inner, HybridOptimizer) and inner._tracking():
        return inner
    return None


@dataclass
class Reading:
    """One read of the forces, aggregated, before it is written: what :meth:`ForceMonitor.write` logs."""

    step: int
    metrics: dict[str, Any]
    forces: dict[str, Any]
    alerts: list[Alert] = dataclasses.field(default_factory=list)

    def logger_metrics(self, prefix: str = "forces/") -> dict[str, float]:
        """The flat scalars a training framework's loggers take (TensorBoard, wandb through Lightning or
        torchtitan): every class metric and each layer's :data:`LOGGER_LAYER_KEYS`, under ``prefix``; per-tensor
        detail stays in the JSONL records."""
        out = {f"{prefix}{k}": v for k, v in self.metrics.items()}
        for layer, agg in self.forces["layers"].items():
            out.update({f"{prefix}layer{layer}/{k}": agg[k] for k in LOGGER_LAYER_KEYS})
        return out


class ForceMonitor:
    """Reads, aggregates and logs an :class:`InstrumentedAdamW`'s forces on log steps; fits Weibulls periodically.

    Args:
        optimizer: an instrumented optimizer (``InstrumentedAdamW``, ``InstrumentedMuon``; tracking on), a wrapper
            around one (accelerate's ``AcceleratedOptimizer``, anything with ``.optimizer``), or several of them —
            a list or a :class:`~instrumented_adamw.optim.hybrid.HybridOptimizer` — read as one: one budget per class,
            layer and tensor, each tensor entry naming the ``optimizer`` that moved it.
        model: optional; names tensors the optimizer knows only as ``group{g}.param{i}`` (built from
            ``model.parameters()``), and its ``config.model_type`` (HF models) picks the naming table of the
            taxonomy.
        sinks: where records go (e.g. ``[JsonlSink(run_dir), WandbSink(...)]``); the first must not fail. Empty on
            ranks that only take part in the reads (FSDP).
        log_every: read and log every N steps (the read is the only host synchronisation).
        weibull_every: per-block Weibull fits every N steps (0 = never).
        per_tensor: include per-tensor entries in the ``forces`` records.
        per_tensor_every: per-tensor entries only on steps that are multiples of N (0: on every read). Each
            entry's interval sums, step counts and residual then cover every step since the previous entry, so
            integrating them still closes the books; its ``last_*`` values and ‖W‖² are those of the read.
        model_type: overrides the model's ``config.model_type``.
        names: ``(name, parameter)`` pairs naming unnamed tensors by identity, for when there is no model.
        open_books: take one read now (discarding the interval so far, if steps were taken before the monitor
            existed), so the first interval's books open on exact norms; under FSDP2 every rank constructs the
            monitor, so the read is collective like every other.
        composer_keys: also put each tensor's last step in the metrics records under Composer's
            ``OptimizerMonitor`` keys (``l2_norm/update/<name>`` = η_u‖û‖, ``l2_norm/param/<name>`` = ‖W‖,
            ``l2_norm_ratio/update_param/<name>``), so dashboards built on them work unchanged (three keys per
            tensor: for small models, or with a ``track_filter``).

    Parameter groups added to the optimizer later (``add_param_group``) are picked up at the next read.
    """

    def __init__(
        self,
        optimizer,
        model: nn.Module | None = None,
        sinks: Iterable[Sink] = (),
        *,
        log_every: int = 10,
        weibull_every: int = 0,
        per_tensor: bool = True,
        per_tensor_every: int = 0,
        model_type: str | None = None,
        trim: float = 0.1,
        names: Iterable[tuple[str, Tensor]] | None = None,
        open_books: bool = True,
        composer_keys: bool = False,
        total_steps: int | None = None,
        lr_at=None,
        diagnostics: LiveDiagnostics | bool = True,
    ) -> None:
        inner = as_tracked(optimizer)
        if inner is None:
            raise TypeError(
                "ForceMonitor needs an instrumented optimizer (InstrumentedAdamW, InstrumentedMuon), a list of them "
                f"or a HybridOptimizer, got {type(optimizer).__name__}"
            )
        if log_every < 1 or weibull_every < 0:
            raise ValueError(f"log_every must be >= 1 and weibull_every >= 0, got {log_every}, {weibull_every}")
        if per_tensor_every < 0:
            raise ValueError(f"per_tensor_every must be >= 0 (0: every read), got {per_tensor_every}")
        self.optimizer = inner
        self.composer_keys = composer_keys
        self.sinks = FanOut(sinks)
        self.log_every, self.weibull_every, self.per_tensor, self.trim = log_every, weibull_every, per_tensor, trim
        self.per_tensor_every = per_tensor_every
        self._pending: dict[str, list[float]] = {}  # per tensor: sums since the last per-tensor entry
        if model_type is None and model is not None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.model_type = model_type
        for source in (model, names):
            if source is not None and inner.has_unnamed_parameters:
                inner.name_parameters(source)
        if inner.has_unnamed_parameters:
            warnings.warn(
                "some tensors are known only as group{g}.param{i} (the optimizer was built from "
                "model.parameters()), so the taxonomy cannot classify them: pass model= or names= to ForceMonitor",
                stacklevel=2,
            )
        self._index(inner.tracked_parameters())
        if not self.names:
            raise ValueError("the optimizer tracks no tensors (track=False or a track_filter that matches nothing)")
        self.last_record: dict[str, Any] | None = None
        self._t_over_tau: dict[str, float] = {}  # cumulative Σ η_t λ_t per class since training began
        self._t_over_tau_layers: dict[str, float] = {}  # and per layer
        if diagnostics is True:
            schedule = getattr(inner, "_wd_schedule", "lr")
            diagnostics = LiveDiagnostics(total_steps, lr_at, weight_decay_schedule=schedule)
        elif diagnostics is False:
            diagnostics = None
        self.diagnostics: LiveDiagnostics | None = diagnostics
        if open_books:
            # The first interval opens on exact (float64) norms taken now, as every later one does at its read, so
            # its residual is exact too, and a run resumed here books exactly as an uninterrupted one.
            inner.read_forces(reset=True)

    def _index(self, params: list[tuple[str, Tensor]]) -> None:
        """Classes, layers and sizes of the tracked tensors, in the optimizer's row order, and which optimizer
        moves each (a hybrid run names it in every tensor entry)."""
        owner = getattr(self.optimizer, "optimizer_of", None)
        self._owner = owner() if owner is not None else {n: type(self.optimizer).__name__ for n, _ in params}
        self.names = [n for n, _ in params]
        self.roles = classify_all(self.names, self.model_type)
        self._params = dict(params)
        self._numel = np.array([p.numel() for _, p in params], dtype=np.float64)
        classes: dict[str, list[int]] = {}
        layers: dict[int, list[int]] = {}
        for i, n in enumerate(self.names):
            role = self.roles[n]
            classes.setdefault(role.cls, []).append(i)
            if role.layer is not None:
                layers.setdefault(role.layer, []).append(i)
        self._classes = {k: np.array(v) for k, v in classes.items()}
        self._layers = {k: np.array(v) for k, v in sorted(layers.items())}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the cumulative diagnostics (T/τ) and, with ``per_tensor_every``, the
        per-tensor sums since the last per-tensor entry (plain lists: a resume state loads with weights_only)."""
        return {
            "t_over_tau": dict(self._t_over_tau),
            "t_over_tau_layers": dict(self._t_over_tau_layers),
            "per_tensor_pending": {k: list(v) for k, v in self._pending.items()},
            "diagnostics": self.diagnostics.state_dict() if self.diagnostics is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._t_over_tau = dict(state.get("t_over_tau", {}))
        self._t_over_tau_layers = dict(state.get("t_over_tau_layers", {}))
        if self.diagnostics is not None:
            self.diagnostics.load_state_dict(state.get("diagnostics", {}))
        self._pending = {k: list(v) for k, v in state.get("per_tensor_pending", {}).items()}

    def step(self, step: int, **scalars: float) -> dict[str, Any] | None:
        """Call after ``optimizer.step()`` with the number of steps done; logs on multiples of ``log_every``."""
        record = None
        if step % self.log_every == 0:
            record = self.log(step, **scalars)
        if self.weibull_every and step % self.weibull_every == 0:
            self.fit(step)
        return record

    def log(self, step: int, **scalars: float) -> dict[str, Any]:
        """Read the forces now (resetting the interval) and write ``metrics`` and ``forces`` records."""
        return self.write(self.read(step), **scalars)

    def read(self, step: int) -> Reading:
        """Read the forces now (resetting the interval) and aggregate them, without writing anything yet.

        Under FSDP2 every rank must call this (the read is a collective). Lets a caller that learns the step's
        loss only later (the HF ``Trainer``) read on time and write once the loss is known.
        """
        readout = self.optimizer.read_forces(reset=True)
        if list(readout.names) != self.names:  # groups added or tensors renamed since the last read
            self._index(self.optimizer.tracked_parameters())
        merged = aggregate_groups(readout, [*self._classes.values(), *self._layers.values()], self._numel)
        classes = dict(zip(self._classes, merged[: len(self._classes)], strict=True))
        layers = dict(zip(map(str, self._layers), merged[len(self._classes) :], strict=True))
        metrics: dict[str, Any] = {}
        diag = self.diagnostics
        for layer, agg in layers.items():
            self._t_over_tau_layers[layer] = self._t_over_tau_layers.get(layer, 0.0) + _all_steps(agg)
            agg["t_over_tau"] = self._t_over_tau_layers[layer]
            if diag is not None:
                agg.update(diag.project(agg, step))
        for c, agg in classes.items():
            self._t_over_tau[c] = self._t_over_tau.get(c, 0.0) + _all_steps(agg)
            agg["t_over_tau"] = self._t_over_tau[c]
            projected = diag.project(agg, step) if diag is not None else {}
            agg.update(projected)
            for key in (*METRIC_KEYS, *projected):
                metrics[f"{c}/{key}"] = agg[key]
        alerts = diag.check(step, classes) if diag is not None else []
        if self.composer_keys:
            metrics.update(composer_metrics(readout))
        forces: dict[str, Any] = dict(classes=classes, layers=layers)
        if self.per_tensor and self.per_tensor_every:
            readout = self._since_last_tensor_entry(readout)
            if step % self.per_tensor_every:
                readout = None  # accumulated: written with the next per-tensor entry
            else:
                self._pending.clear()
        if self.per_tensor and readout is not None:
            tensors = {}
            each = aggregate_groups(readout, [np.array([i]) for i in range(len(self.names))], self._numel)
            for i, (name, agg) in enumerate(zip(self.names, each, strict=True)):
                role = self.roles[name]
                last = {f"last_{k}": float(v) for k, v in zip(LAST_KEYS, readout.last[i], strict=True)}
                tensors[name] = dict(agg, **last, numel=int(self._numel[i]), cls=role.cls, layer=role.layer,
                                     component=role.component, optimizer=self._owner.get(name))  # fmt: skip
            forces["tensors"] = tensors
        return Reading(step, metrics, forces, alerts)

    def _since_last_tensor_entry(self, readout: ForceReadout) -> ForceReadout:
        """This read's per-tensor sums plus those accumulated since the last per-tensor entry (kept as the new
        accumulation; :meth:`read` clears it when it writes an entry). Residuals add up exactly: each is ‖W‖² at
        the read minus ‖W‖² before its first step minus its forces, and one interval starts where the last ended."""
        width = len(QUANTITIES) + 4  # interval sums, steps, nonfinite steps, unmeasured steps, residual
        prev = np.array([self._pending.get(n, [0.0] * width) for n in readout.names], dtype=np.float64)
        prev = prev.reshape(len(readout.names), width)
        q = len(QUANTITIES)
        combined = dataclasses.replace(
            readout,
            interval=readout.interval + prev[:, :q],
            steps=readout.steps + prev[:, q].astype(np.int64),
            nonfinite_steps=readout.nonfinite_steps + prev[:, q + 1].astype(np.int64),
            unmeasured_steps=readout.unmeasured_steps + prev[:, q + 2].astype(np.int64),
            residual=readout.residual + prev[:, q + 3],
        )
        rows = np.column_stack((combined.interval, combined.steps, combined.nonfinite_steps,
                                combined.unmeasured_steps, combined.residual))  # fmt: skip
        self._pending = {n: row.tolist() for n, row in zip(readout.names, rows, strict=True)}
        return combined

    def write(self, reading: Reading, **scalars: float) -> dict[str, Any]:
        """Write a :class:`Reading` as ``metrics`` (the caller's scalars first) and ``forces`` records."""
        now = time.time()
        metrics: dict[str, Any] = {k: float(v) for k, v in scalars.items()}
        metrics["time"] = now
        metrics.update(reading.metrics)
        if reading.alerts:  # in the step's metrics record; wandb and TensorBoard sinks raise them as alerts / text
            metrics["alerts"] = [a.record() for a in reading.alerts]
            _to_console(reading.alerts)
        self.sinks.log("metrics", metrics, reading.step)
        self.sinks.log("forces", dict(reading.forces, time=now), reading.step)
        self.last_record = metrics
        return metrics

    @torch.no_grad()
    def fit(self, step: int) -> dict[str, Any]:
        """Per-block Weibull fits of every tracked ≥ 2-D tensor; writes a ``weibull`` record."""
        blocks = []
        for name in self.names:
            p = self._params[name]
            if p.ndim < 2:
                continue
            if hasattr(p, "full_tensor"):  # a DTensor (any mesh, any placement): gather the matrix, one all-gather
                p = p.full_tensor()  # per matrix and fit (a collective: every rank calls fit and fits the same)
            role = self.roles[name]
            try:
                fit = fit_weibull(p, self.trim)
            except ValueError:
                continue  # constant or all-zero matrix: nothing to fit, nothing logged for it this time
            blocks.append(dict(fit.to_dict(), name=name, layer=role.layer, component=role.component, cls=role.cls))
        record: dict[str, Any] = dict(time=time.time(), trim=self.trim, blocks=blocks)
        summary = {}
        for cls in sorted({b["cls"] for b in blocks}):
            ks = [b["k"] for b in blocks if b["cls"] == cls]
            lams = [b["lam"] for b in blocks if b["cls"] == cls]
            summary[f"weibull/{cls}/k_median"] = float(np.median(ks))
            summary[f"weibull/{cls}/lam_median"] = float(np.median(lams))
        record["summary"] = summary
        self.sinks.log("weibull", record, step)
        return record

    def sync(self) -> None:
        """Put the records written so far on disk (JSONL sinks): call before a checkpoint that a run resumes from."""
        self.sinks.sync()

    def close(self) -> None:
        self.sinks.close()
