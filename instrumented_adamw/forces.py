"""Device-side accumulation of per-tensor forces, and the host-side read-out.

``ForceStats`` holds, per device, one float64 table with a row per tracked tensor: the last step's values, the
interval sums since the last reset, and bookkeeping counters. Every update is a handful of small device ops with
Python scalars as kernel arguments, so ``step()`` never waits on the device. A read copies the whole table to the
host in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Per-step quantities, integrated over intervals. Order is the column order of the device table.
QUANTITIES = ("w_dot_u", "u_sq", "w_sq", "align", "inject", "decay", "higher_order", "eta_lambda")
#: What ``last_forces().to_dict()`` reports per tensor: the quantities plus the hyperparameters of that step.
LAST_KEYS = QUANTITIES + ("lr", "weight_decay")
#: The four forces whose sum is Δ‖W‖² of a step.
FORCES = ("align", "inject", "decay", "higher_order")

_NQ = len(QUANTITIES)
_LAST = slice(0, len(LAST_KEYS))
_SUM = slice(len(LAST_KEYS), len(LAST_KEYS) + _NQ)
_START_W_SQ = _SUM.stop  # ‖W‖² before the first step integrated in the interval
_STEPS = _START_W_SQ + 1  # steps integrated (finite, not skipped)
_NONFINITE = _STEPS + 1  # steps whose reductions were NaN/Inf (kept out of the sums)
_LAST_FINITE = _NONFINITE + 1  # 1.0 if the last recorded step was finite
_WIDTH = _LAST_FINITE + 1

#: Quantities that are sums over the elements of a tensor (everything but the per-step hyperparameters), so a
#: sharded tensor's value is the sum of its shards' values.
_ELEMENT_SUMS = [q != "eta_lambda" for q in QUANTITIES]


def additive_columns() -> list[bool]:
    """Which columns of the device table add up across the shards of a tensor (FSDP): the element sums in the
    last-step and interval blocks, and ‖W‖² at the interval start; not η, λ, η·λ or the step counters."""
    cols = [False] * _WIDTH
    for i, additive in enumerate(_ELEMENT_SUMS):
        cols[_LAST.start + i] = additive
        cols[_SUM.start + i] = additive
    cols[_START_W_SQ] = True
    return cols


def forces_from_reductions(red: Tensor, lr, weight_decay) -> Tensor:
    """``[k, 3]`` reductions ``(⟨W,û⟩, ‖û‖², ‖W‖²)`` -> ``[k, 10]`` rows in ``LAST_KEYS`` order.

    ``eta_lambda`` = η·λ of the step (the per-step shrink factor of decoupled decay); its interval sum is the
    interval's share of the training budget T/τ = Σ η_t λ_t.

    ``lr`` and ``weight_decay`` are floats or 0-d tensors (on any device; moved without synchronising). The
    identity ``align + inject + decay + higher_order = ‖(1-ηλ)W - ηû‖² - ‖W‖²`` holds exactly in real arithmetic.
    """
    wu, uu, ww = red.unbind(1)
    eta = lr.detach().to(red.device, torch.float64) if isinstance(lr, Tensor) else float(lr)
    lam = (
        weight_decay.detach().to(red.device, torch.float64) if isinstance(weight_decay, Tensor) else float(weight_decay)
    )
    align = -2.0 * eta * wu
    inject = eta * eta * uu
    decay = -2.0 * eta * lam * ww
    higher = 2.0 * eta * eta * lam * wu + (eta * lam) * (eta * lam) * ww
    eta_col = eta.expand_as(wu) if isinstance(eta, Tensor) else torch.full_like(wu, eta)
    lam_col = lam.expand_as(wu) if isinstance(lam, Tensor) else torch.full_like(wu, lam)
    return torch.stack((wu, uu, ww, align, inject, decay, higher, eta_col * lam_col, eta_col, lam_col), dim=1)


class ForceStats:
    """The float64 force table of one device (rows = tracked tensors on that device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.table = torch.zeros(0, _WIDTH, dtype=torch.float64, device=device)
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    def add_rows(self, names: list[str]) -> list[int]:
        first = len(self.names)
        self.names.extend(names)
        extra = torch.zeros(len(names), _WIDTH, dtype=torch.float64, device=self.device)
        self.table = torch.cat((self.table, extra))
        return list(range(first, first + len(names)))

    def _index(self, rows: tuple[int, ...]) -> Tensor:
        idx = self._index_cache.get(rows)
        if idx is None:
            # Built once per distinct row set (usually once per param group), not per step.
            idx = torch.tensor(rows, dtype=torch.long).to(self.device)
            self._index_cache[rows] = idx
        return idx

    def record(self, rows: tuple[int, ...], values: Tensor, skip: Tensor | None = None) -> None:
        """Fold one step's ``[k, len(LAST_KEYS)]`` values into rows; ``skip`` (0-d, nonzero = skip) drops the step."""
        idx = self._index(rows)
        block = self.table.index_select(0, idx)
        finite = torch.isfinite(values[:, :_NQ]).all(dim=1)
        if skip is None:
            recorded = torch.ones_like(finite)
        else:
            recorded = (skip.to(self.device) == 0).expand_as(finite)
        valid = finite & recorded
        new = block.clone()
        new[:, _LAST] = torch.where(recorded[:, None], values, block[:, _LAST])
        new[:, _SUM] = block[:, _SUM] + torch.where(valid[:, None], values[:, :_NQ], 0.0)
        first = valid & (block[:, _STEPS] == 0)
        new[:, _START_W_SQ] = torch.where(first, values[:, 2], block[:, _START_W_SQ])
        new[:, _STEPS] = block[:, _STEPS] + valid.double()
        new[:, _NONFINITE] = block[:, _NONFINITE] + (recorded & ~finite).double()
        new[:, _LAST_FINITE] = torch.where(recorded, finite.double(), block[:, _LAST_FINITE])
        self.table.index_copy_(0, idx, new)

    def reset_interval(self) -> None:
        self.table[:, _SUM] = 0.0
        self.table[:, _START_W_SQ] = 0.0
        self.table[:, _STEPS] = 0.0
        self.table[:, _NONFINITE] = 0.0


@dataclass(frozen=True)
class ForceReadout:
    """Host copy of the force tables: last step and interval integrals, per tracked tensor.

    Arrays are indexed like ``names``. ``interval`` holds Σ over the steps integrated since the previous reset of
    each quantity in ``QUANTITIES``; ``steps`` how many steps that was; ``nonfinite_steps`` how many steps were
    left out because a reduction was NaN/Inf. ``residual`` is ‖W‖² now − ‖W‖² before the interval − Σ forces: zero
    up to rounding for fp32 parameters, the rounding of the stored weights for bf16 ones, and anything that
    changed W outside the optimizer. ``last_residual`` is the same for the last step alone.
    """

    names: tuple[str, ...]
    last: np.ndarray  # [n, len(LAST_KEYS)]
    interval: np.ndarray  # [n, len(QUANTITIES)]
    steps: np.ndarray  # [n] int
    nonfinite_steps: np.ndarray  # [n] int
    last_finite: np.ndarray  # [n] bool
    w_sq_now: np.ndarray  # [n]
    residual: np.ndarray  # [n]
    last_residual: np.ndarray  # [n]

    @classmethod
    def from_tables(cls, names: list[str], table: np.ndarray, w_sq_now: np.ndarray) -> ForceReadout:
        last = table[:, _LAST]
        interval = table[:, _SUM]
        steps = table[:, _STEPS].astype(np.int64)
        force_cols = [QUANTITIES.index(f) for f in FORCES]
        with np.errstate(invalid="ignore"):
            residual = np.where(
                steps > 0, w_sq_now - table[:, _START_W_SQ] - interval[:, force_cols].sum(axis=1), np.nan
            )
            last_residual = w_sq_now - last[:, 2] - last[:, force_cols].sum(axis=1)
        return cls(
            names=tuple(names),
            last=last,
            interval=interval,
            steps=steps,
            nonfinite_steps=table[:, _NONFINITE].astype(np.int64),
            last_finite=table[:, _LAST_FINITE] > 0,
            w_sq_now=w_sq_now,
            residual=residual,
            last_residual=last_residual,
        )

    @classmethod
    def empty(cls) -> ForceReadout:
        return cls.from_tables([], np.zeros((0, _WIDTH)), np.zeros(0))

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a tracked tensor; tracked: {', '.join(self.names[:8])}...") from None

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Last step, per tensor: ``{name: {w_dot_u, u_sq, w_sq, align, inject, decay, higher_order, lr,
        weight_decay}}`` as Python floats (NaN where that step was non-finite)."""
        rows = zip(self.names, self.last, strict=True)
        return {n: dict(zip(LAST_KEYS, map(float, row), strict=True)) for n, row in rows}

    def interval_dict(self) -> dict[str, dict[str, float]]:
        """Interval integrals per tensor, plus ``steps``, ``nonfinite_steps`` and ``residual``."""
        out = {}
        for i, n in enumerate(self.names):
            row = dict(zip(QUANTITIES, map(float, self.interval[i]), strict=True))
            row.update(
                steps=int(self.steps[i]),
                nonfinite_steps=int(self.nonfinite_steps[i]),
                residual=float(self.residual[i]),
            )
            out[n] = row
        return out

    def __len__(self) -> int:
        return len(self.names)
