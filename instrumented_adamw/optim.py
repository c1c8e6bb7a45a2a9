"""``InstrumentedAdamW``: ``torch.optim.AdamW`` that measures the force budget of ‖W‖² every step."""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.optimizer import _default_to_fused_or_foreach, _to_scalar, _use_grad_for_differentiable

from . import cpu_adamw
from .forces import ForceReadout, ForceStats, additive_columns, forces_from_reductions
from .functional import Arena, StackedReductions, delegated_adamw, multi_tensor_adamw, single_tensor_adamw
from .reductions import sq_norm_exact

WEIGHT_DECAY_SCHEDULES = ("lr", "lr_squared")
#: Names given to tensors passed without names (``model.parameters()``); the monitor renames them from the model.
_GENERIC_NAME = re.compile(r"group\d+\.param\d+")
#: Dtypes for which torch's single-tensor and foreach AdamW agree bitwise on CPU (tests/test_torch_optim_db.py).
_SAME_MATH_DTYPES = (torch.float32, torch.float64)
#: Relative slack when checking lr_t ≤ η_max for ``lr_squared`` (schedulers compute the peak in float arithmetic).
_PEAK_SLACK = 1e-9

try:  # FSDP2 parameters are DTensors; plain torch builds without distributed support have none
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Shard = None  # type: ignore[assignment,misc]


def unwrap_optimizer(optimizer):
    """The optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer`` and others keep it in
    ``.optimizer``), so ``unwrap_optimizer(opt).read_forces()`` works whatever the training framework handed out."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, InstrumentedAdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 16:  # a wrapper that points at itself
            break
    return optimizer


def _local(t):
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


class InstrumentedAdamW(torch.optim.AdamW):
    r"""AdamW whose ``step()`` also measures, per tensor, why ‖W‖² changed.

    The update is torch's AdamW, ``W₊ = (1 − ηλ)W − η·û`` with ``û = m̂/(√v̂ + ε)``: parameters and state are
    bitwise equal to ``torch.optim.AdamW`` with the same arguments (single-tensor, foreach and fused paths), and
    state dicts move both ways. With W the **pre-update** weights, the change of the squared norm splits exactly:

    .. math::
        ‖W₊‖² − ‖W‖² = \underbrace{−2η⟨W,û⟩}_{align} + \underbrace{η²‖û‖²}_{inject}
                      + \underbrace{−2ηλ‖W‖²}_{decay} + \underbrace{2η²λ⟨W,û⟩ + η²λ²‖W‖²}_{higher\ order}

    Emitted per tracked tensor and step (``last_forces().to_dict()[name]``); all float64, accumulated on the device
    every tracked step into interval sums that ``read_forces()`` returns and resets:

    ================  ====================================  =================================================
    key               definition                            meaning / sign
    ================  ====================================  =================================================
    ``w_dot_u``       ⟨W, û⟩                                raw inner product (W pre-update)
    ``u_sq``          ‖û‖²                                  raw step magnitude
    ``w_sq``          ‖W‖²                                  squared norm before the step
    ``align``         −2η⟨W, û⟩                             learning signal; growth-positive (> 0 grows ‖W‖)
    ``inject``        η²‖û‖²                                always ≥ 0: a step of any direction adds norm
    ``decay``         −2ηλ‖W‖²                              decoupled weight decay, always ≤ 0
    ``higher_order``  2η²λ⟨W,û⟩ + η²λ²‖W‖²                  cross terms; make the identity exact, tiny
    ``eta_lambda``    η·λ                                   per-step decay factor; Σ over steps is T/τ
    ``lr``            η of the tensor's group at that step
    ``weight_decay``  λ applied at that step                equals the group's λ unless ``lr_squared``
    ================  ====================================  =================================================

    û uses the AMSGrad running max for v̂ when ``amsgrad=True`` and the negated gradient with ``maximize=True``.
    Half/bf16 parameters: û is computed in fp32 from the stored moments; the difference between the forces and
    the actual change of the rounded weights is reported as ``residual`` by :meth:`read_forces`. Complex
    parameters are reduced on their real view (‖W‖² of a complex tensor). Steps with NaN/Inf reductions proceed
    exactly as torch's would, are counted in ``nonfinite_steps`` and kept out of the interval sums; steps skipped
    by ``GradScaler`` record nothing.

    Update paths: single-tensor and foreach mirror torch's op for op (bitwise equal); with default flags on CPU,
    float32/float64 tensors take the foreach one, which there gives torch's single-tensor values bitwise.
    ``fused=True`` on CPU runs a single-pass C kernel (``cpu_adamw``, built once with the system C compiler):
    update and reductions in one read of p, g, m, v, bitwise equal to torch's fused CPU AdamW (float32/float64,
    contiguous, without GradScaler); ``instrumented_adamw.cpu_adamw.status()`` says whether it is active. On CUDA
    it runs our single-pass Triton kernel (``triton_adamw``), with parameters within fp32 rounding of torch's fused
    AdamW (not bitwise: fp32 math in another order). Elsewhere (no compiler, half precision, GradScaler,
    capturable/differentiable), torch's own functional AdamW does the update and a second pass takes the
    reductions (bitwise equal). Under ``torch.compile`` the same choices hold (the CPU kernel is an operator in
    the graph), so a compiled step is bitwise the compiled ``torch.optim.AdamW`` step with the same flags.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused: as
            :class:`torch.optim.AdamW` (same positions and defaults). ``model.named_parameters()`` keeps the names;
            otherwise tensors are named ``group{g}.param{i}``.
        track (bool): measure forces (default: True). With False this is plain AdamW.
        track_every (int): measure every N-th ``step()`` call (default: 1). Interval sums then cover only the
            measured steps; ``steps`` in the read-out says how many, ``unmeasured_steps`` how many were not, and
            the residual is undefined (NaN) over intervals with unmeasured steps. Under ``torch.compile`` the
            choice is made on the device (the reductions run every step and unmeasured ones are masked out).
        track_filter (Callable[[str], bool], optional): which tensor names to measure (default: all).
        weight_decay_schedule (str): ``"lr"`` (torch's decoupled decay, per-step shrink ηλ) or ``"lr_squared"``
            (λ_t = λ·η_t/η_max, per-step shrink ∝ η², after Chou, arXiv 2512.08217).
        lr_peak (float, optional): η_max of ``lr_squared`` for every group (a group's own ``"lr_peak"`` key wins).
            Without it, η_max is the group's ``max_lr`` (OneCycleLR), else its ``initial_lr`` (any LR scheduler:
            the base lr, which most schedules never exceed), else the lr the group was created with. A step whose
            lr exceeds η_max raises (CyclicLR, for one, keeps its ``max_lr`` on the scheduler): pass ``lr_peak``.

    Copies (``copy.deepcopy``, pickling) step and track exactly like the original; a ``track_filter`` that cannot
    be pickled (a lambda) is kept by ``deepcopy`` but not by pickling, after which adding a group asks for a new
    one (``opt.track_filter = fn``).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        track: bool = True,
        track_every: int = 1,
        track_filter: Callable[[str], bool] | None = None,
        weight_decay_schedule: str = "lr",
        lr_peak: float | None = None,
    ) -> None:
        if not isinstance(track_every, int) or isinstance(track_every, bool) or track_every < 1:
            raise ValueError(f"Invalid track_every: {track_every!r} (a positive int, 1 = every step)")
        if weight_decay_schedule not in WEIGHT_DECAY_SCHEDULES:
            raise ValueError(
                f"Invalid weight_decay_schedule: {weight_decay_schedule!r}; choose one of {WEIGHT_DECAY_SCHEDULES}"
            )
        if track_filter is not None and not callable(track_filter):
            raise TypeError(f"track_filter must be a callable name -> bool, got {type(track_filter).__name__}")
        _check_peak(lr_peak, "lr_peak")
        # Set before super().__init__, which calls add_param_group for every group.
        self._track = bool(track)
        self._track_every = track_every
        self._track_filter = track_filter
        self._filter_lost = False  # unpickled without its (unpicklable) track_filter
        self._wd_schedule = weight_decay_schedule
        self._lr_peak = lr_peak
        self._created_lr: list[float | None] = []  # per group: the fallback η_max of lr_squared
        self._names: dict[int, str] = {}  # id(param) -> name, every parameter of every group
        self._generic: set[int] = set()  # parameters named group{g}.param{i} (passed without names)
        # Calls of step(), as a CPU tensor updated in place: torch.compile keeps tensor mutations, but drops
        # attribute stores on an optimizer it traces. Reading it is a host read, never a device sync.
        self._calls = torch.zeros((), dtype=torch.int64)
        self._rows: dict[int, tuple[torch.device, int]] = {}
        self._sharded_rows: dict[torch.device, list[bool]] = {}  # rows whose tensor is a DTensor shard
        self._shard_group = None  # process group of the DTensor parameters (one 1-D mesh)
        self._stats: dict[torch.device, ForceStats] = {}
        self._tracked_params: dict[torch.device, list[Tensor]] = {}
        self._arena = Arena()
        self._plans: dict[tuple[int, torch.device, torch.dtype], Any] = {}  # Triton launch tables per group bucket
        self._kernel_launches = 0
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )

    # ------------------------------------------------------------------ groups, names, state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._filter_lost:
            raise RuntimeError(
                "this optimizer was unpickled without its track_filter (it could not be pickled, e.g. a lambda); "
                "set opt.track_filter = <a function name -> bool> before adding parameter groups"
            )
        super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        group = self.param_groups[g]
        group.setdefault("lr_peak", self._lr_peak)
        _check_peak(group["lr_peak"], f"param_groups[{g}]['lr_peak']")
        lr = group["lr"]
        self._created_lr.append(float(lr) if not isinstance(lr, Tensor) else None)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            self._names[id(p)] = names[i] if names else f"group{g}.param{i}"
            if not names:
                self._generic.add(id(p))
        self._rebuild_tracking()

    def _rebuild_tracking(self, keep: bool = True, only: set[int] | None = None) -> None:
        """Rows of the force tables for every tracked tensor, in parameter-group order, one table per device.

        Rows of tensors tracked before keep their values (``keep``), so renaming or adding a group loses nothing.
        ``only`` (parameter ids) replaces the filter: a restored copy tracks exactly what the original tracked.
        """
        old_rows, old_stats = self._rows, self._stats
        self._rows, self._stats, self._tracked_params, self._sharded_rows = {}, {}, {}, {}
        self._shard_group = None
        by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[id(p)]
                if only is not None:
                    selected = id(p) in only
                else:
                    selected = self._track_filter is None or self._track_filter(name)
                if selected:
                    by_device.setdefault(p.device, []).append((name, p))
        for device, items in by_device.items():
            stats = self._stats[device] = ForceStats(device)
            rows = stats.add_rows([n for n, _ in items])
            self._sharded_rows[device] = [self._check_sharded(n, p) for n, p in items]
            self._tracked_params[device] = [p for _, p in items]
            for (_, p), row in zip(items, rows, strict=True):
                self._rows[id(p)] = (device, row)
                old = old_rows.get(id(p)) if keep else None
                if old is not None:
                    stats.table[row] = old_stats[old[0]].table[old[1]]

    @property
    def track_filter(self) -> Callable[[str], bool] | None:
        return self._track_filter

    @track_filter.setter
    def track_filter(self, fn: Callable[[str], bool] | None) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"track_filter must be a callable name -> bool, got {type(fn).__name__}")
        self._track_filter, self._filter_lost = fn, False
        self._rebuild_tracking()

    def name_parameters(self, named: nn.Module | Iterable[tuple[str, Tensor]], only_unnamed: bool = True) -> int:
        """Name tensors by identity from ``model.named_parameters()`` (or the module itself); returns how many.

        For optimizers built from ``model.parameters()`` (HF ``Trainer``'s ``optimizer_cls_and_kwargs``, a user's
        param groups): their tensors are named ``group{g}.param{i}``, which the taxonomy cannot classify. With
        ``only_unnamed`` (default) names the optimizer already has are kept. ``track_filter`` is applied again
        to the new names; the values measured so far stay with their tensors.
        """
        items = named.named_parameters() if isinstance(named, nn.Module) else named
        by_id = {}
        for name, p in items:
            by_id.setdefault(id(p), name)  # tied weights: the first name, as named_parameters() reports them
        renamed = 0
        for pid in list(self._names):
            if pid in by_id and (pid in self._generic or not only_unnamed):
                self._names[pid] = by_id[pid]
                self._generic.discard(pid)
                renamed += 1
        if renamed:
            self._rebuild_tracking()
        return renamed

    @property
    def has_unnamed_parameters(self) -> bool:
        """True if some tensors are known only as ``group{g}.param{i}`` (see :meth:`name_parameters`)."""
        return bool(self._generic)

    def _check_sharded(self, name: str, p: Tensor) -> bool:
        """True for a DTensor shard (FSDP2): its reductions are partial sums, combined across ranks on read."""
        if DTensor is None or not isinstance(p, DTensor):
            return False
        mesh = p.device_mesh
        if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise NotImplementedError(
                f"{name}: DTensor placements {p.placements} on a {mesh.ndim}-D mesh; force tracking supports "
                "parameters sharded on one mesh dimension (FSDP2 fully_shard). Pass track_filter to skip it."
            )
        group = mesh.get_group()
        if self._shard_group is not None and group != self._shard_group:
            raise NotImplementedError(f"{name}: parameters sharded over different process groups")
        self._shard_group = group
        return True

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus the call counter as ``param_groups[0]["track_calls"]``.

        The counter sets which calls ``track_every`` measures; carrying it makes a resumed run measure the steps an
        uninterrupted one would. It rides in a param group because every checkpointer (torch.save, the HF Trainer,
        torch.distributed.checkpoint) keeps group keys; ``torch.optim.AdamW`` loads such a dict and ignores it.
        """
        state = super().state_dict()
        if state["param_groups"]:
            state["param_groups"][0]["track_calls"] = int(self._calls)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") or [{}]
        calls = groups[0].get("track_calls")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("track_calls", None)
        if calls is not None:  # absent in dicts saved by torch.optim.AdamW: the count goes on from here
            self._calls.fill_(int(calls))

    # ------------------------------------------------------------------ copies
    # Optimizer.__getstate__ keeps only defaults, state and param_groups; the tracking state (names, force tables,
    # counters) is carried beside them, per parameter in group order, because it is keyed by tensor identity.
    _CARRIED = ("_track", "_track_every", "_wd_schedule", "_lr_peak", "_created_lr", "_calls", "_kernel_launches")

    def _portable_state(self, keep_filter: bool) -> dict[str, Any]:
        state = super().__getstate__()
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                where = self._rows.get(id(p))
                row = self._stats[where[0]].table[where[1]].clone() if where is not None else None
                rows.append((self._names[id(p)], id(p) in self._generic, row))
        filt = self._track_filter
        lost = self._filter_lost
        if filt is not None and not keep_filter:
            try:
                pickle.dumps(filt)
            except (pickle.PicklingError, AttributeError, TypeError):
                filt, lost = None, True
        extra = {k: self.__dict__[k] for k in self._CARRIED}
        extra.update(rows=rows, track_filter=filt, filter_lost=lost)
        return dict(state, _instrumented=extra)

    def __getstate__(self) -> dict[str, Any]:
        return self._portable_state(keep_filter=False)

    def __deepcopy__(self, memo: dict) -> InstrumentedAdamW:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._portable_state(keep_filter=True), memo))
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict comes through here too (without "_instrumented"): groups saved by torch.optim.AdamW
        # have no "lr_peak".
        state = dict(state)
        extra = state.pop("_instrumented", None)
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lr_peak", None)
        if extra is not None:
            self._restore_tracking(extra)

    def _restore_tracking(self, extra: dict[str, Any]) -> None:
        """Rebuild the identity-keyed tracking state of an unpickled or deep-copied optimizer."""
        for key in self._CARRIED:
            setattr(self, key, extra[key])
        self._track_filter, self._filter_lost = extra["track_filter"], extra["filter_lost"]
        self._arena, self._plans = Arena(), {}
        self._names, self._generic, self._rows, self._stats = {}, set(), {}, {}
        params = [p for group in self.param_groups for p in group["params"]]
        for p, (name, generic, _) in zip(params, extra["rows"], strict=True):
            self._names[id(p)] = name
            if generic:
                self._generic.add(id(p))
        tracked = {id(p) for p, (_, _, row) in zip(params, extra["rows"], strict=True) if row is not None}
        self._rebuild_tracking(keep=False, only=tracked)
        for p, (_, _, row) in zip(params, extra["rows"], strict=True):
            if row is not None:
                device, r = self._rows[id(p)]
                self._stats[device].table[r] = row.to(device)

    @property
    def tracked_names(self) -> list[str]:
        return [n for stats in self._stats.values() for n in stats.names]

    def tracked_parameters(self) -> list[tuple[str, Tensor]]:
        """(name, parameter) of every tracked tensor, in the row order of :meth:`read_forces`."""
        out = []
        for device, stats in self._stats.items():
            out.extend(zip(stats.names, self._tracked_params[device], strict=True))
        return out

    def peak_lr(self, group_index: int) -> tuple[float, str]:
        """η_max of ``lr_squared`` for a group, and where it came from (see the class docstring)."""
        group = self.param_groups[group_index]
        for key, source in (
            ("lr_peak", "lr_peak"),
            ("max_lr", "max_lr (set by OneCycleLR)"),
            ("initial_lr", "initial_lr (the base lr an LR scheduler starts from)"),
        ):
            value = group.get(key)
            if value is not None:
                return _float(value, key), source
        created = self._created_lr[group_index]
        if created is None:
            raise ValueError(
                "weight_decay_schedule='lr_squared' needs a float peak lr: the group was created with a tensor lr; "
                "pass lr_peak=..."
            )
        return created, "the lr the group was created with"

    def _effective_weight_decay(self, group: dict[str, Any], group_index: int):
        wd = group["weight_decay"]
        if self._wd_schedule == "lr":
            return wd
        lr = group["lr"]
        if isinstance(lr, Tensor):
            raise ValueError(
                "weight_decay_schedule='lr_squared' needs float learning rates (a tensor lr would need a host "
                "sync to scale the decay); pass lr as a float"
            )
        peak, source = self.peak_lr(group_index)
        if lr > peak * (1 + _PEAK_SLACK):
            raise ValueError(
                f"weight_decay_schedule='lr_squared': param_groups[{group_index}] has lr {lr:.6g} above its peak "
                f"{peak:.6g}, taken from {source}, so λ_t = λ·η_t/η_max would exceed λ. The schedule's maximum is "
                "not known to the optimizer (CyclicLR, for one, keeps max_lr on the scheduler): pass "
                "lr_peak=<the schedule's maximum lr> to InstrumentedAdamW, or set param_groups[i]['lr_peak']"
            )
        return wd * lr / peak

    # ------------------------------------------------------------------ step
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform one AdamW step and, on tracked steps, fold its forces into the device-side tables."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or self._cuda_graph_capture_health_check
        check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        compiling = torch.compiler.is_compiling()
        self._calls.add_(1)  # in place: survives torch.compile
        mask = None  # under compile with track_every > 1: "measure this step", decided as a tensor
        if not self._track:
            measuring = False
        elif self._track_every == 1:
            measuring = True
        elif compiling:
            measuring, mask = True, (self._calls - 1) % self._track_every == 0
        else:
            measuring = (int(self._calls) - 1) % self._track_every == 0  # a CPU counter: no device sync
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        for g_index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            if not params:
                continue
            tracked = [measuring and id(p) in self._rows for p in params]
            beta1, beta2 = group["betas"]
            lr = _to_scalar(group["lr"])  # torch accepts one-element tensors of any shape
            weight_decay = self._effective_weight_decay(group, g_index)
            # DTensor shards: AdamW is elementwise, so updating each local shard in place is the sharded update;
            # the reductions become per-shard partial sums.
            local = [[_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
            lists = (*local, state_steps, tracked)
            common = dict(
                amsgrad=group["amsgrad"], lr=lr, weight_decay=weight_decay, eps=group["eps"], maximize=group["maximize"]
            )

            path = self._path(
                group, local, scaled=grad_scale is not None or found_inf is not None, tracking=any(tracked)
            )
            arena = self._arena if params[0].device.type == "cpu" and not compiling else None
            if path == "cpu":
                out = cpu_adamw.fused_adamw_cpu(*lists, beta1=beta1, beta2=beta2, **common)
                positions = [i for i, flag in enumerate(tracked) if flag]
                reductions = StackedReductions(positions, out if len(positions) == len(params) else out[positions])
                skip = None
            elif path == "triton":
                reductions = self._triton_step(
                    *lists, group_index=g_index, beta1=beta1, beta2=beta2, grad_scale=grad_scale,
                    found_inf=found_inf, **common,
                )  # fmt: skip
                skip = found_inf
            elif path == "delegated":
                reductions = delegated_adamw(
                    *lists,
                    has_complex=has_complex,
                    beta1=beta1,
                    beta2=beta2,
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    arena=arena,
                    **common,
                )
                skip = found_inf
            elif path == "foreach":
                reductions = multi_tensor_adamw(
                    *lists, has_complex=has_complex, beta1=beta1, beta2=beta2, arena=arena, **common
                )
                skip = None
            else:
                reductions = single_tensor_adamw(*lists, beta1=beta1, beta2=beta2, **common)
                skip = None
            if reductions:
                self._record(params, reductions, lr, weight_decay, skip, mask)  # original params: rows keyed by id
            elif self._track and not measuring:
                self._record_unmeasured(params, skip)
        return loss

    @staticmethod
    def _triton_device(device: torch.device) -> bool:
        """Whether the single-pass Triton kernel serves ``fused=True`` on this device (CUDA with Triton)."""
        if device.type != "cuda":
            return False
        try:
            import triton  # noqa: F401 - CUDA builds of torch ship it
        except ImportError:
            return False
        return True

    def _path(self, group: dict[str, Any], local: list[list[Tensor]], *, scaled: bool, tracking: bool) -> str:
        """Same choice as ``torch.optim.adam.adam``. ``fused=True`` runs a single-pass kernel (update + reductions)
        on CUDA (Triton) and, where it fits, on CPU (``cpu_adamw``); elsewhere fused, capturable, differentiable and
        tensor hyperparameters (lr or betas given as tensors) delegate to torch's own update, which handles them
        bitwise as torch does. With default flags on CPU, where torch runs its single-tensor implementation, float32
        and float64 tensors take the multi-tensor one: torch's CPU foreach ops run the same per-tensor kernels
        there, so the values are the same bitwise, and it is twice as fast (``docs/benchmarks.md``). (Not for half
        precision, where torch's two implementations differ.)
        ``local``: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs."""
        params = local[0]
        if (
            group["fused"]
            and not group["differentiable"]
            and self._triton_device(params[0].device)
            and all(p.is_contiguous() and not p.is_complex() for p in params)
        ):
            return "triton"
        if group["fused"] and tracking and not scaled and self._cpu_kernel_fits(group, local):
            return "cpu"
        if group["fused"] or group["capturable"] or group["differentiable"]:
            return "delegated"
        if isinstance(group["lr"], Tensor) or isinstance(group["betas"][0], Tensor):
            return "delegated"  # tensor hyperparameters: torch's own update handles every shape and device
        foreach = group["foreach"]
        if foreach is None and group["fused"] is None:
            _, foreach = _default_to_fused_or_foreach(params, group["differentiable"], use_fused=False)
            if not foreach and all(p.device.type == "cpu" and p.dtype in _SAME_MATH_DTYPES for p in params):
                foreach = not torch.compiler.is_compiling()  # compiled, torch's own choice traces the same graph
        return "foreach" if foreach else "single"

    @staticmethod
    def _cpu_kernel_fits(group: dict[str, Any], local: list[list[Tensor]]) -> bool:
        """Whether ``cpu_adamw`` can do this group's fused step bitwise as torch would: contiguous CPU tensors of a
        dtype it serves and float hyperparameters. GradScaler's scale and found_inf, differentiable and tensor
        hyperparameters stay with torch's own update. ``capturable`` is no reason: torch's fused CPU kernel ignores
        it, and torch.compile sets it on every group while it traces ``step()``."""
        params = local[0]
        if group["differentiable"] or not params or params[0].device.type != "cpu":
            return False
        if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return False
        amsgrad = group["amsgrad"]
        for i, p in enumerate(params):
            others = [ts[i] for ts in local[1 : 5 if amsgrad else 4]]
            if p.device.type != "cpu" or not p.is_contiguous() or p.is_complex():
                return False
            if not all(t.dtype == p.dtype and t.is_contiguous() and t.layout == torch.strided for t in others):
                return False
        return all(cpu_adamw.serves(d) for d in {str(p.dtype).removeprefix("torch.") for p in params})

    def _triton_step(
        self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, tracked, *, group_index, amsgrad,
        beta1, beta2, lr, weight_decay, eps, maximize, grad_scale, found_inf,
    ):  # fmt: skip
        """One launch pair per (device, dtype) bucket of a group; steps stay on the device (no host sync)."""
        from .triton_adamw import fused_adamw_reduce

        torch._foreach_add_(state_steps, 1)
        buckets: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((group_index, p.device, p.dtype), []).append(i)
        out = {}
        for key, idx in buckets.items():

            def pick(xs, idx=idx):
                return [xs[i].detach() for i in idx]

            grads_b = [grads[i].contiguous() for i in idx]
            steps = torch.stack([state_steps[i].to(params[idx[0]].device) for i in idx]).float()
            red, self._plans[key] = fused_adamw_reduce(
                pick(params), grads_b, pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else [],
                steps, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
                maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, plan=self._plans.get(key),
            )  # fmt: skip
            self._kernel_launches += 1
            for j, i in enumerate(idx):
                if tracked[i]:
                    out[i] = red[j]
        if found_inf is not None:  # a skipped step does not count, as in torch's fused AdamW
            torch._foreach_sub_(state_steps, [found_inf.to(s.device) for s in state_steps])
        return out

    def _record_unmeasured(self, params: list[Tensor], skip: Tensor | None) -> None:
        """Count a step that moved tracked tensors without measuring them (their residual cannot close)."""
        by_device: dict[torch.device, list[int]] = {}
        for p in params:
            where = self._rows.get(id(p))
            if where is not None:
                by_device.setdefault(where[0], []).append(where[1])
        for device, rows in by_device.items():
            self._stats[device].record_unmeasured(tuple(rows), skip)

    def _record(self, params: list[Tensor], reductions, lr, weight_decay, skip: Tensor | None, mask=None) -> None:
        if isinstance(reductions, StackedReductions):  # one device, already stacked in row order of positions
            device, _ = self._rows[id(params[reductions.positions[0]])]
            rows = tuple(self._rows[id(params[i])][1] for i in reductions.positions)
            values = forces_from_reductions(reductions.values.to(device), lr, weight_decay)
            self._stats[device].record(rows, values, skip, measured=mask)
            return
        by_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        for i, red in reductions.items():
            device, row = self._rows[id(params[i])]
            rows, reds = by_device.setdefault(device, ([], []))
            rows.append(row)
            reds.append(red.to(device))
        for device, (rows, reds) in by_device.items():
            values = forces_from_reductions(torch.stack(reds), lr, weight_decay)
            self._stats[device].record(tuple(rows), values, skip, measured=mask)

    # ------------------------------------------------------------------ read-out
    @torch.no_grad()
    def read_forces(self, reset: bool = True) -> ForceReadout:
        """Last-step values and the integrals since the previous reset, for every tracked tensor.

        One device-to-host copy per device (this is the synchronisation point; call it on log steps only). Also
        measures ‖W‖² now, which closes the books: ``residual`` = ‖W‖²_now − ‖W‖²_start − Σ forces.

        With FSDP2 (DTensor shards) every rank must call it: the per-shard partial sums of all tensors are combined
        with **one** all-reduce per device table, and every rank gets the global values.
        """
        names: list[str] = []
        tables, w_now = [], []
        for device, stats in self._stats.items():
            if not stats.names:
                continue
            local = [_local(p) for p in self._tracked_params[device]]
            real = [torch.view_as_real(p) if p.is_complex() else p for p in local]
            w_sq = torch.stack([sq_norm_exact(r) for r in real])  # float64: the residual is a small difference
            packed = torch.cat((stats.table, w_sq[:, None]), dim=1)
            if any(self._sharded_rows[device]):
                packed = self._combine_shards(packed, device)
            host = packed.cpu().numpy()
            names.extend(stats.names)
            tables.append(host[:, :-1])
            w_now.append(host[:, -1])
            if reset:
                stats.reset_interval(w_sq)  # local (per-shard) norms: START_W_SQ adds up across ranks
        if not names:
            return ForceReadout.empty()
        return ForceReadout.from_tables(names, np.concatenate(tables), np.concatenate(w_now))

    def _combine_shards(self, packed: Tensor, device: torch.device) -> Tensor:
        """Sum the additive columns over ranks in one all-reduce; rows of unsharded (replicated) tensors count
        once (rank 0's), the per-step hyperparameters and counters stay local (identical on every rank)."""
        import torch.distributed as dist

        cols = torch.tensor(additive_columns() + [True], device=device)
        sharded = torch.tensor(self._sharded_rows[device], device=device)
        first = dist.get_rank(self._shard_group) == 0
        weight = torch.where(sharded, 1.0, 1.0 if first else 0.0).to(packed.dtype)
        contrib = torch.where(cols[None, :], packed * weight[:, None], torch.zeros_like(packed))
        dist.all_reduce(contrib, group=self._shard_group)
        return torch.where(cols[None, :], contrib, packed)

    def last_forces(self) -> ForceReadout:
        """Like :meth:`read_forces` without resetting the interval; ``.to_dict()`` gives the last step."""
        return self.read_forces(reset=False)


def _check_peak(value, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"Invalid {what}: {value!r} (a positive finite float, the schedule's maximum lr)")


def _float(value, key: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"param group key {key!r} must be one number, got a tensor of shape {tuple(value.shape)}")
        return float(value)  # a host read, on lr_squared groups whose scheduler stored a tensor peak
    return float(value)
