"""Device-side accumulation of per-tensor forces, and the host-side read-out.

``ForceStats`` holds, per device, one float64 table with a row per tracked tensor: the last step's values, the
interval sums since the last reset, and bookkeeping counters. Every update is a handful of small device ops with
Python scalars as kernel arguments (on the Triton path, the same arithmetic inside its second kernel), so ``step()``
never waits on the device. A read copies the whole table to the host in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from instrumented_adamw.kernels.force_table import (  # noqa: F401 - the layout, re-exported
    FORCES,
    LAST_BLOCK,
    LAST_FINITE,
    LAST_KEYS,
    N_QUANTITIES,
    NONFINITE,
    QUANTITIES,
    START_KNOWN,
    START_W_SQ,
    STEPS,
    SUM_BLOCK,
    TABLE_LAYOUT,
    UNMEASURED,
    UNMEASURED_SINCE_LAST,
    WIDTH,
)

#: Quantities that are sums over the elements of a tensor (everything but the per-step hyperparameters), so a
#: sharded tensor's value is the sum of its shards' values.
_ELEMENT_SUMS = [q != "eta_lambda" for q in QUANTITIES]


def additive_columns() -> list[bool]:
    """Which columns of the device table add up across the shards of a tensor (FSDP): the element sums in the
    last-step and interval blocks, and ‖W‖² at the interval start; not η, λ, η·λ or the step counters."""
    cols = [False] * WIDTH
    for i, additive in enumerate(_ELEMENT_SUMS):
        cols[LAST_BLOCK.start + i] = additive
        cols[SUM_BLOCK.start + i] = additive
    cols[START_W_SQ] = True
    return cols


def forces_from_reductions(red: Tensor, lr, weight_decay, update_lr=None) -> Tensor:
    """``[k, 3]`` reductions ``(⟨W,u⟩, ‖u‖², ‖W‖²)`` -> ``[k, len(LAST_KEYS)]`` rows in ``LAST_KEYS`` order.

    For the update ``W₊ = (1 − ηλ)W − η_u·u`` (AdamW: u = û and η_u = η; Muon: u = O, the orthogonalised
    momentum, and η_u the shape-adjusted lr):
    align −2η_u⟨W,u⟩, inject η_u²‖u‖², decay −2ηλ‖W‖², higher order 2η_u·ηλ⟨W,u⟩ + (ηλ)²‖W‖², whose sum is
    ‖W₊‖² − ‖W‖² exactly in real arithmetic. ``eta_lambda`` = η·λ (the per-step shrink of decoupled decay); its
    interval sum is the interval's share of the training budget T/τ = Σ η_t λ_t.

    ``lr`` and ``weight_decay`` are floats or one-element tensors of any shape, as torch accepts them (on any device;
    moved without synchronising); ``update_lr`` is None (= ``lr``), a float, or a ``[k]`` tensor (one per row).
    """
    wu, uu, ww = red.unbind(1)
    eta, lam = _scalar(lr, red.device), _scalar(weight_decay, red.device)
    if update_lr is None:
        eta_u = eta
    elif isinstance(update_lr, Tensor) and update_lr.numel() == len(wu) and update_lr.dim() == 1:
        eta_u = update_lr.to(red.device, torch.float64)
    else:
        eta_u = _scalar(update_lr, red.device)
    shrink = eta * lam
    align = -2.0 * eta_u * wu
    inject = eta_u * eta_u * uu
    decay = -2.0 * shrink * ww
    higher = 2.0 * eta_u * shrink * wu + shrink * shrink * ww

    def column(x):
        return x.expand_as(wu) if isinstance(x, Tensor) else torch.full_like(wu, x)

    eta_col, lam_col = column(eta), column(lam)
    return torch.stack(
        (wu, uu, ww, align, inject, decay, higher, eta_col * lam_col, eta_col, lam_col, column(eta_u)), dim=1
    )


#: Unit roundoff of fp32 (2^-24); ε₃₂ = 2u is torch.finfo(torch.float32).eps.
_U32 = 2.0**-24
#: Worst-case relative error of one fp32 row of the blocked reductions (``reductions.ROW`` = 128 products and
#: sums, Higham's γ_n = nu/(1−nu)); rows are added in float64, which adds nothing at this scale.
GAMMA_ROW = 128 * _U32 / (1 - 128 * _U32)


def fp32_closure_bound(w_sq: float, w_next_sq: float, u_sq: float, lr: float, weight_decay: float) -> float:
    """Worst-case |‖W₊‖² − ‖W‖² − Σ forces| of one step of fp32 parameters (the one-step residual).

    Two sources, both outside what the forces describe:

    * **the fp32 update and storage**: torch rounds the decay factor and product, the quotient m/(√v̂+ε) and
      its step size, and the final add, and stores W₊ in fp32. As an error δ of W₊,
      ‖δ‖ ≤ ε₃₂·((1−ηλ)‖W‖ + 3η‖û‖ + ‖W₊‖), so |‖W₊‖² − ‖W₊*‖²| ≤ 2‖W₊‖‖δ‖ + 3‖δ‖². This holds when a tensor
      collapses in one step (W₊ ≈ 0), where a bound proportional to ‖W₊‖² does not.
    * **the reductions**: fp32 rows of 128 products (float64 across rows) are off by at most γ₁₂₈ ≈ 7.6e-6 of
      Σ|terms| each, so the forces are off by at most γ₁₂₈·(2η(1+ηλ)‖W‖‖û‖ + η²‖û‖² + ηλ(2+ηλ)‖W‖²). This term
      dominates when the forces nearly cancel; in practice rounding errors are random and 10²–10⁴× smaller.

    With float64 parameters both vanish to ~1e-9 of the budget.
    """
    w, w_next, u = math.sqrt(w_sq), math.sqrt(w_next_sq), math.sqrt(u_sq)
    eta_lam = lr * weight_decay
    delta = 2 * _U32 * ((1 - eta_lam) * w + 3 * lr * u + w_next)
    storage = 2 * w_next * delta + 3 * delta * delta
    reductions = GAMMA_ROW * (2 * lr * (1 + eta_lam) * w * u + lr * lr * u_sq + eta_lam * (2 + eta_lam) * w_sq)
    return storage + reductions


def _scalar(x, device: torch.device):
    """A float, or a one-element tensor (torch accepts lr of shape [1], [1, 1]) as 0-d float64 on ``device``."""
    if isinstance(x, Tensor):
        return x.detach().reshape(()).to(device, torch.float64)
    return float(x)


class ForceStats:
    """The float64 force table of one device (rows = tracked tensors on that device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.table = torch.zeros(0, WIDTH, dtype=torch.float64, device=device)
        self._index_cache: dict[tuple, Tensor] = {}

    def add_rows(self, names: list[str]) -> list[int]:
        first = len(self.names)
        self.names.extend(names)
        extra = torch.zeros(len(names), WIDTH, dtype=torch.float64, device=self.device)
        self.table = torch.cat((self.table, extra))
        return list(range(first, first + len(names)))

    def row_index(self, rows: tuple[int, ...]) -> Tensor:
        """``rows`` as a long tensor on the table's device (−1 may stand for "no row" where a kernel takes it)."""
        idx = self._index_cache.get(rows)
        if idx is None:
            # Built once per distinct row set (usually once per param group), not per step.
            idx = torch.tensor(rows, dtype=torch.long).to(self.device)
            self._index_cache[rows] = idx
        return idx

    def record(self, rows: tuple[int, ...], values: Tensor, skip: Tensor | None = None, measured=None) -> None:
        """Fold one step's ``[k, len(LAST_KEYS)]`` values into rows.

        ``skip`` (0-d, nonzero = skip: GradScaler found inf) means the step did not happen: nothing changes.
        ``measured`` (0-d bool tensor, or None = measured) is False on a step that moved W but is not to be
        measured (``track_every`` under ``torch.compile``, where the choice must stay on the device): it is
        counted as unmeasured instead.
        """
        idx = self.row_index(rows)
        block = self.table.index_select(0, idx)
        finite = torch.isfinite(values[:, :N_QUANTITIES]).all(dim=1)
        happened = torch.ones_like(finite) if skip is None else (skip.to(self.device) == 0).expand_as(finite)
        if measured is None:
            recorded, unmeasured = happened, torch.zeros_like(finite)
        else:
            m = measured.to(self.device).expand_as(finite)
            recorded, unmeasured = happened & m, happened & ~m
        valid = finite & recorded
        new = block.clone()
        new[:, LAST_BLOCK] = torch.where(recorded[:, None], values, block[:, LAST_BLOCK])
        new[:, SUM_BLOCK] = block[:, SUM_BLOCK] + torch.where(valid[:, None], values[:, :N_QUANTITIES], 0.0)
        first = valid & (block[:, STEPS] == 0) & (block[:, START_KNOWN] == 0)
        new[:, START_W_SQ] = torch.where(first, values[:, 2], block[:, START_W_SQ])
        new[:, STEPS] = block[:, STEPS] + valid.double()
        new[:, NONFINITE] = block[:, NONFINITE] + (recorded & ~finite).double()
        new[:, LAST_FINITE] = torch.where(recorded, finite.double(), block[:, LAST_FINITE])
        new[:, UNMEASURED] = block[:, UNMEASURED] + unmeasured.double()
        new[:, UNMEASURED_SINCE_LAST] = torch.where(
            recorded, 0.0, block[:, UNMEASURED_SINCE_LAST] + unmeasured.double()
        )
        self.table.index_copy_(0, idx, new)

    def record_unmeasured(self, rows: tuple[int, ...], skip: Tensor | None = None) -> None:
        """A step that moved these rows' tensors without measuring them (``track_every > 1``): one small update."""
        idx = self.row_index(rows)
        add = torch.ones((), dtype=torch.float64, device=self.device)
        if skip is not None:
            add = (skip.to(self.device) == 0).double()
        cols = self._unmeasured_cols()
        self.table[idx[:, None], cols] += add

    def _unmeasured_cols(self) -> Tensor:
        cols = self._index_cache.get(("unmeasured",))
        if cols is None:
            cols = torch.tensor([UNMEASURED, UNMEASURED_SINCE_LAST]).to(self.device)
            self._index_cache[("unmeasured",)] = cols
        return cols

    def reset_interval(self, w_sq_now: Tensor | None = None) -> None:
        """Start a new interval; ``w_sq_now`` (each row's exact ‖W‖² at this read) is where its books open."""
        self.table[:, SUM_BLOCK] = 0.0
        # Without a read's ‖W‖², the books open at the first measured step's own ‖W‖² (see ``record``); until then
        # the start is unknown and the residual undefined.
        known = w_sq_now is not None
        if known:
            self.table[:, START_W_SQ] = w_sq_now.to(self.table)
        self.table[:, START_KNOWN] = float(known)
        self.table[:, STEPS] = 0.0
        self.table[:, NONFINITE] = 0.0
        self.table[:, UNMEASURED] = 0.0


@dataclass(frozen=True)
class ForceReadout:
    """Host copy of the force tables: last step and interval integrals, per tracked tensor.

    Arrays are indexed like ``names``. ``interval`` holds Σ over the steps integrated since the previous reset of
    each quantity in ``QUANTITIES``; ``steps`` how many steps that was; ``nonfinite_steps`` how many steps were
    left out because a reduction was NaN/Inf; ``unmeasured_steps`` how many steps moved the tensor without being
    measured (``track_every > 1``). ``residual`` is ‖W‖² now − ‖W‖² before the interval − Σ forces: zero up to
    rounding for fp32 parameters, the rounding of the stored weights for bf16 ones, and anything that changed W
    outside the optimizer. It is NaN (undefined) where the interval holds unmeasured steps: ‖W‖² changed over
    those as well, and no force accounts for them. ``last_residual`` is the same for the last measured step
    alone (NaN once an unmeasured step has followed it).
    """

    names: tuple[str, ...]
    last: np.ndarray  # [n, len(LAST_KEYS)]
    interval: np.ndarray  # [n, len(QUANTITIES)]
    steps: np.ndarray  # [n] int
    nonfinite_steps: np.ndarray  # [n] int
    unmeasured_steps: np.ndarray  # [n] int
    last_finite: np.ndarray  # [n] bool
    w_sq_now: np.ndarray  # [n]
    residual: np.ndarray  # [n]
    last_residual: np.ndarray  # [n]

    @classmethod
    def from_tables(cls, names: list[str], table: np.ndarray, w_sq_now: np.ndarray) -> ForceReadout:
        last = table[:, LAST_BLOCK]
        interval = table[:, SUM_BLOCK]
        steps = table[:, STEPS].astype(np.int64)
        force_cols = [QUANTITIES.index(f) for f in FORCES]
        unmeasured = table[:, UNMEASURED].astype(np.int64)
        with np.errstate(invalid="ignore"):
            # Books close over an interval of measured steps only; with no step, its start is known only from a read.
            closes = (unmeasured == 0) & ((steps > 0) | (table[:, START_KNOWN] > 0))
            residual = np.where(closes, w_sq_now - table[:, START_W_SQ] - interval[:, force_cols].sum(axis=1), np.nan)
            last_residual = np.where(
                table[:, UNMEASURED_SINCE_LAST] == 0, w_sq_now - last[:, 2] - last[:, force_cols].sum(axis=1), np.nan
            )
        return cls(
            names=tuple(names),
            last=last,
            interval=interval,
            steps=steps,
            nonfinite_steps=table[:, NONFINITE].astype(np.int64),
            unmeasured_steps=unmeasured,
            last_finite=table[:, LAST_FINITE] > 0,
            w_sq_now=w_sq_now,
            residual=residual,
            last_residual=last_residual,
        )

    @classmethod
    def concat(cls, readouts: list[ForceReadout]) -> ForceReadout:
        """One read-out of several optimizers' (a hybrid run): rows in the given order; names must not repeat."""
        names = [n for r in readouts for n in r.names]
        if len(set(names)) != len(names):
            raise ValueError("the read-outs track a tensor twice: each tensor belongs to one optimizer")
        if not readouts:
            return cls.empty()
        fields = {
            f: np.concatenate([getattr(r, f) for r in readouts]) for f in cls.__dataclass_fields__ if f != "names"
        }
        return cls(names=tuple(names), **fields)

    @classmethod
    def empty(cls) -> ForceReadout:
        return cls.from_tables([], np.zeros((0, WIDTH)), np.zeros(0))

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
        """Interval integrals per tensor, plus ``steps``, ``nonfinite_steps``, ``unmeasured_steps`` and ``residual``
        (NaN where unmeasured steps leave it undefined)."""
        out = {}
        for i, n in enumerate(self.names):
            row = dict(zip(QUANTITIES, map(float, self.interval[i]), strict=True))
            row.update(
                steps=int(self.steps[i]),
                nonfinite_steps=int(self.nonfinite_steps[i]),
                unmeasured_steps=int(self.unmeasured_steps[i]),
                residual=float(self.residual[i]),
            )
            out[n] = row
        return out

    def __len__(self) -> int:
        return len(self.names)
