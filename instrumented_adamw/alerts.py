"""Live theory diagnostics: where T/τ ends, and warnings that say what to change — each once per run and class.

Decoupled weight decay makes the weights an exponential moving average of their updates over τ_iter = 1/(ηλ) steps
(Wang & Aitchison, ICML 2025); T/τ = Σ_t η_t λ_t counts the timescales a run spans, and ‖W‖ can settle at the
equilibrium its forces imply (align + inject = −decay) only once T/τ is of order one. From the per-class interval
aggregates the monitor already has (no extra device work), :class:`LiveDiagnostics` projects T/τ to the end of the
lr schedule and raises :class:`Alert` s:

* ``decay_cannot_balance`` — T/τ projected to the end of the schedule below ``min_t_over_tau``: decay cannot balance
  alignment before the run ends (λ too small for this schedule); says by how much to raise λ.
* ``overshoot_relaxing`` — the RMS rose, peaked and has fallen by ``relax_drop`` while still above its equilibrium:
  the overshoot-and-relax regime the papers describe (information, nothing to change).
* ``align_collapse`` — the align share fell below ``align_floor`` after reaching ``align_peak``: updates no longer
  move along or against the weights; learning may have stalled.
* ``update_ratio_high`` / ``update_ratio_low`` — the last step's ‖η·û‖/‖W‖ outside ``ratio_band`` (low only while
  the lr is at least a tenth of its largest so far, so a scheduled anneal does not count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ALERT_KINDS = ("decay_cannot_balance", "overshoot_relaxing", "align_collapse", "update_ratio_high", "update_ratio_low")


@dataclass(frozen=True)
class Alert:
    kind: str
    group: str  # the class (Transmission, QKV, ...)
    step: int
    message: str

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "class": self.group, "step": self.step, "message": self.message}


class LiveDiagnostics:
    """T/τ projected to the end of the schedule per class and layer, and the alerts above.

    Args:
        total_steps: the schedule's last step; without it nothing is projected and ``decay_cannot_balance`` is off.
        lr_at: the lr of the ``step``-th optimizer step, counting from 1 (``lr_at(step) -> float``, any scale:
            only ratios are used); without it the projection holds the current lr to the end.
        weight_decay_schedule: the optimizer's (``"lr"``: λ_t = λ; ``"lr_squared"``: λ_t ∝ η_t).
        min_t_over_tau, relax_drop, align_peak, align_floor, ratio_band: the alerts' thresholds.
    """

    def __init__(
        self,
        total_steps: int | None = None,
        lr_at: Callable[[int], float] | None = None,
        *,
        weight_decay_schedule: str = "lr",
        min_t_over_tau: float = 1.0,
        relax_drop: float = 0.02,
        align_peak: float = 0.5,
        align_floor: float = 0.1,
        ratio_band: tuple[float, float] = (1e-4, 1e-1),
    ) -> None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be a positive number of steps, got {total_steps}")
        if not 0 < ratio_band[0] < ratio_band[1]:
            raise ValueError(f"ratio_band must be (low, high) with 0 < low < high, got {ratio_band}")
        self.total_steps, self.lr_at, self.schedule = total_steps, lr_at, weight_decay_schedule
        self.min_t_over_tau, self.relax_drop = min_t_over_tau, relax_drop
        self.align_peak, self.align_floor, self.ratio_band = align_peak, align_floor, ratio_band
        self._lr_sums: np.ndarray | None = None  # Σ_{t<=s} lr_at(t)^p, for s = 0..total
        self.fired: set[tuple[str, str]] = set()
        self.history: dict[str, dict[str, float]] = {}  # per class: first / peak RMS, peak align share, max lr

    # ------------------------------------------------------------------ projection
    def _remaining(self, step: int, power: int) -> float | None:
        """Σ_{t=step+1}^{total} (η_t/η_step)^power, or None where the schedule says η_step = 0."""
        total = self.total_steps
        if self.lr_at is None:
            return float(max(total - step, 0))
        if self._lr_sums is None or len(self._lr_sums) != total + 1:
            lrs = np.array([float(self.lr_at(t)) for t in range(1, total + 1)], dtype=np.float64)
            self._lr_sums = np.concatenate(([0.0], np.cumsum(np.abs(lrs) ** power)))
        now = abs(float(self.lr_at(step))) if step >= 1 else abs(float(self.lr_at(1)))
        if now == 0:
            return None
        s = min(max(step, 0), total)
        return float(self._lr_sums[total] - self._lr_sums[s]) / now**power

    def project(self, agg: dict[str, float], step: int) -> dict[str, float]:
        """``t_over_tau_end`` (T/τ so far plus the schedule's remaining Σ η_t λ_t at the last step's η and λ) and
        ``tau_frac`` (τ_iter over the whole schedule); empty without ``total_steps``."""
        if self.total_steps is None:
            return {}
        eta_lambda = 1.0 / agg["tau_iter"] if agg["tau_iter"] > 0 else 0.0  # NaN (no decay) -> 0
        power = 2 if self.schedule == "lr_squared" else 1
        remaining = self._remaining(step, power)
        end = agg["t_over_tau"] + eta_lambda * remaining if remaining is not None else math.nan
        return {"t_over_tau_end": end, "tau_frac": agg["tau_iter"] / self.total_steps}

    # ------------------------------------------------------------------ alerts
    def check(self, step: int, classes: dict[str, dict[str, float]]) -> list[Alert]:
        """The alerts these class aggregates (with :meth:`project`'s keys) raise for the first time."""
        out: list[Alert] = []
        for cls, agg in classes.items():
            seen = self.history.setdefault(cls, {})
            for kind, message in self._rules(cls, agg, seen, step):
                if (kind, cls) not in self.fired:
                    self.fired.add((kind, cls))
                    out.append(Alert(kind, cls, step, message))
        return out

    def _rules(self, cls: str, agg: dict[str, float], seen: dict[str, float], step: int):
        rms, ratio, share, lr = agg["rms"], agg["update_weight_ratio"], agg["align_share"], agg.get("last_lr", math.nan)
        if math.isfinite(rms):
            seen.setdefault("first_rms", rms)
            if rms > seen.get("peak_rms", -math.inf):
                seen["peak_rms"], seen["peak_rms_step"] = rms, step
        if math.isfinite(share) and share > seen.get("peak_align", -math.inf):
            seen["peak_align"], seen["peak_align_step"] = share, step
        # Whether the lr is past its rise (warmup): by the schedule where given, else unchanged since the last read.
        settled = self._settled(step, lr, seen)
        if math.isfinite(lr):
            seen["max_lr"] = max(seen.get("max_lr", 0.0), lr)
            seen["last_lr"] = lr

        end = agg.get("t_over_tau_end", math.nan)
        wd, eq = agg.get("last_weight_decay", math.nan), agg["rms_over_eq"]
        if math.isfinite(end) and wd > 0 and end < self.min_t_over_tau and (self.lr_at is not None or settled):
            need = self.min_t_over_tau / end if end > 0 else math.inf
            msg = (
                f"{cls}: T/τ at the end of the schedule is projected at {end:.3g} (< {self.min_t_over_tau:g}): "
                "weight decay cannot balance alignment before the run ends, so ‖W‖ stays off the equilibrium its "
                f"forces imply (now {eq:.3g}× it). Raise weight_decay about {need:.3g}× (λ = {wd * need:.3g} at "
                "this lr) or train longer."
            )
            yield "decay_cannot_balance", msg
        peak, first = seen.get("peak_rms", math.nan), seen.get("first_rms", math.nan)
        if peak > first * (1 + self.relax_drop) and rms <= peak * (1 - self.relax_drop) and eq > 1:
            at = int(seen["peak_rms_step"])
            msg = (
                f"{cls}: the RMS rose from {first:.4g} to a peak of {peak:.4g} (step {at}) and has relaxed "
                f"{1 - rms / peak:.1%} since, still {eq:.3g}× its equilibrium: the overshoot-and-relax regime "
                "(information; nothing to change)."
            )
            yield "overshoot_relaxing", msg
        top = seen.get("peak_align", math.nan)
        if top >= self.align_peak and share < self.align_floor:
            at = int(seen["peak_align_step"])
            msg = (
                f"{cls}: the align share fell from {top:.2f} (step {at}) to {share:.2f}: updates no longer move "
                "along or against the weights, and the norm is set by inject against decay alone (a random walk). "
                "Learning may have stalled: check the loss, and whether the lr decayed too far."
            )
            yield "align_collapse", msg
        low, high = self.ratio_band
        band = f"{ratio:.3g} of their norm (usual band {low:g}–{high:g})"
        if ratio > high:
            msg = (
                f"{cls}: each step moves the weights by {band}: the lr is likely too high for these weights (or "
                "they are near zero: check their initialisation)."
            )
            yield "update_ratio_high", msg
        if ratio < low and settled and lr >= 0.1 * seen.get("max_lr", 0.0):
            msg = (
                f"{cls}: each step moves the weights by {band} at an lr near its largest so far: learning will be "
                "slow; the lr is likely too low for these weights."
            )
            yield "update_ratio_low", msg

    def _settled(self, step: int, lr: float, seen: dict[str, float]) -> bool:
        """Past the lr's rise: at or after the schedule's peak (``lr_at``), or without a schedule the same lr as at
        the previous read (a warmup's lr changes from read to read; its low ratios and low projections are not
        the run's)."""
        if self.lr_at is not None and self.total_steps is not None:
            if "peak_step" not in seen:
                lrs = [abs(float(self.lr_at(t))) for t in range(1, self.total_steps + 1)]
                seen["peak_step"] = float(1 + max(range(len(lrs)), key=lrs.__getitem__))
            return step >= seen["peak_step"]
        previous = seen.get("last_lr", math.nan)
        return math.isfinite(lr) and previous == lr

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Alerts already raised and the peaks they compare against: a resumed run raises none twice."""
        return {"fired": sorted(list(k) for k in self.fired), "history": {c: dict(h) for c, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = {tuple(k) for k in state.get("fired", [])}
        self.history = {c: dict(h) for c, h in state.get("history", {}).items()}


def lr_at_from_scheduler(scheduler) -> Callable[[int], float] | None:
    """``lr_at`` of a ``LambdaLR`` (the HF Trainer's schedules, most hand-written ones): the first group's lr at a
    step, without stepping the scheduler; None for other schedulers (the projection then holds the current lr)."""
    for _ in range(4):  # accelerate's and DeepSpeed's wrappers keep the scheduler in .scheduler / .lr_scheduler
        inner = getattr(scheduler, "scheduler", None) or getattr(scheduler, "lr_scheduler", None)
        if inner is None or inner is scheduler or getattr(scheduler, "lr_lambdas", None):
            break
        scheduler = inner
    lambdas, bases = getattr(scheduler, "lr_lambdas", None), getattr(scheduler, "base_lrs", None)
    if not lambdas or not bases or not callable(lambdas[0]):
        return None
    fn, base = lambdas[0], float(bases[0])
    return lambda step: base * float(fn(max(step - 1, 0)))  # step t runs at the lr of the scheduler's (t-1)-th step
