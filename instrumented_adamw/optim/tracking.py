"""What every instrumented optimizer shares: tensor names, the device force tables, read-outs, copies, schedules.

:class:`ForceTracking` is a mixin placed before a torch optimizer class (``class InstrumentedAdamW(ForceTracking,
torch.optim.AdamW)``). The optimizer's own ``step()`` does its update and hands the per-tensor reductions
``[⟨W,u⟩, ‖u‖², ‖W‖²]`` (W before the update, u the direction the update used) to :meth:`ForceTracking._record`,
with the lr of the update and the lr and λ of the decay. Everything else is here, written once:

* names (``named_parameters``, ``group{g}.param{i}`` otherwise, :meth:`name_parameters` from a model) and
  ``track_filter``;
* the float64 force tables on each device (:mod:`.forces`), the read-out with one device-to-host copy per device,
  and the combine of DTensor shards' partial sums (any placement on any mesh) with one all-reduce per process
  group;
* when to measure (``track_every``, as a CPU tensor counter that survives ``torch.compile``), carried in state
  dicts, deep copies and pickles;
* decoupled decay schedules: ``"lr"`` (torch's) and ``"lr_squared"`` (λ_t = λ·η_t/η_max, with η_max found from the
  scheduler or given).

Optimizers instrumented: :class:`~instrumented_adamw.optim.InstrumentedAdamW` and
:class:`~instrumented_adamw.optim.muon.InstrumentedMuon`.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instrumented_adamw.optim.forces import (
    START_KNOWN,
    START_W_SQ,
    ForceReadout,
    ForceStats,
    additive_columns,
    forces_from_reductions,
)
from instrumented_adamw.optim.functional import StackedReductions
from instrumented_adamw.optim.sharding import _distinct, _summing_groups, local_tensor
from instrumented_adamw.optim.zero import ZeroMap, dp_groups, map_partition, refuse_unmappable, sq_norms_on

WEIGHT_DECAY_SCHEDULES = ("lr", "lr_squared")
#: Names given to tensors passed without names (``model.parameters()``); the monitor renames them from the model.
_GENERIC_NAME = re.compile(r"group\d+\.param\d+")
#: Relative slack when checking lr_t ≤ η_max for ``lr_squared`` (schedulers compute the peak in float arithmetic).
_PEAK_SLACK = 1e-9


def unwrap_optimizer(optimizer):
    """The optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer`` and others keep it in
    ``.optimizer``), so ``unwrap_optimizer(opt).read_forces()`` works whatever the training framework handed out."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, ForceTracking) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 16:  # a wrapper that points at itself
            break
    return optimizer


class ForceTracking:
    """Mixin of the shared tracking machinery; see the module docstring. Subclasses call :meth:`_init_tracking`
    before ``torch.optim.Optimizer.__init__`` (which calls ``add_param_group`` for every group)."""

    #: Whether the update acts element by element (AdamW), so that it may run on slices of DeepSpeed's flat
    #: partitions (:mod:`.zero`); Muon's needs whole matrices.
    _ELEMENTWISE = False

    def _init_tracking(
        self,
        *,
        track: bool,
        track_every: int,
        track_filter: Callable[[str], bool] | None,
        weight_decay_schedule: str,
        lr_peak: float | None,
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
        self._track = bool(track)
        self._track_every = track_every
        self._track_filter = track_filter
        self._filter_lost = False  # unpickled without its (unpicklable) track_filter
        self._wd_schedule = weight_decay_schedule
        self._lr_peak = lr_peak
        self._created_lr: list[float | None] = []  # per group: the fallback η_max of lr_squared
        self._names: dict[int, str] = {}  # id(param) -> name, every parameter of every group
        self._given: list[list[Tensor]] = []  # each group's tensors as given (DeepSpeed may replace them)
        self._zero = ZeroMap()  # DeepSpeed ZeRO-1/2 flat partitions, mapped back to the parameters
        self._generic: set[int] = set()  # parameters named group{g}.param{i} (passed without names)
        # Calls of step(), as a CPU tensor updated in place: torch.compile keeps tensor mutations, but drops
        # attribute stores on an optimizer it traces. Reading it is a host read, never a device sync.
        self._calls = torch.zeros((), dtype=torch.int64)
        self._rows: dict[int, tuple[torch.device, int]] = {}
        # DTensor rows: per device table, the process groups each row's element sums are summed over (the groups of
        # its sharded mesh dimensions), and every such group once, in the order rows first name them.
        self._row_groups: dict[torch.device, list[tuple[Any, ...]]] = {}
        self._sum_groups: dict[torch.device, list[Any]] = {}
        self._stats: dict[torch.device, ForceStats] = {}
        self._tracked_params: dict[torch.device, list[Tensor]] = {}
        self._known_lists: tuple[int, ...] | None = None  # param lists last checked to hold only known tensors
        self._group_shapes: list[list[tuple[int, tuple[int, ...]]]] = []  # (id, shape) of each group's tensors then
        self._reset_host_caches()

    def _reset_host_caches(self) -> None:
        """Per-process caches a subclass rebuilds on demand (after a copy or unpickling): none here."""

    def _begin_step(self) -> tuple[bool, Tensor | None]:
        """Count the call; (measure this step?, and under ``torch.compile`` with ``track_every > 1`` the same as a
        tensor, since the choice must then stay in the graph: the reductions run and unmeasured ones are masked)."""
        if self._track and not torch.compiler.is_compiling():
            self._check_params_known()
        if self._zero.counts(self.param_groups):  # DeepSpeed steps one group per call: one count per step
            self._calls.add_(1)  # in place: survives torch.compile
        if not self._track:
            return False, None
        if self._track_every == 1:
            return True, None
        if torch.compiler.is_compiling():
            return True, (self._calls - 1) % self._track_every == 0
        return (int(self._calls) - 1) % self._track_every == 0, None  # a CPU counter: no device sync

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
        group["track_calls"] = int(self._calls)
        self._given.append(list(group["params"]))
        lr = group["lr"]
        self._created_lr.append(float(lr) if not isinstance(lr, Tensor) else None)
        names = group.get("param_names")
        taken = set(self._names.values())
        for i, p in enumerate(group["params"]):
            name = names[i] if names else f"group{g}.param{i}"
            if name in taken:  # torch accepts repeated names; the read-out is keyed by name and must keep both
                name = _disambiguate(name, taken, f"{type(self).__name__}: param_groups[{g}]")
            taken.add(name)
            self._names[id(p)] = name
            if not names:
                self._generic.add(id(p))
        self._rebuild_tracking()

    def _rebuild_tracking(self, keep: bool = True, only: set[int] | None = None) -> None:
        """Rows of the force tables for every tracked tensor, in parameter-group order, one table per device.

        Rows of tensors tracked before keep their values (``keep``), so renaming or adding a group loses nothing.
        ``only`` (parameter ids) replaces the filter: a restored copy tracks exactly what the original tracked.
        """
        self._check_params_known(cached=False)
        old_rows, old_stats = self._rows, self._stats
        self._rows, self._stats, self._tracked_params, self._row_groups, self._sum_groups = {}, {}, {}, {}, {}
        by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for group in self.param_groups:
            for p in self._zero.owners(group["params"], self._given):
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
            self._row_groups[device] = [self._summed_over(n, p) for n, p in items]
            self._sum_groups[device] = _distinct(g for groups in self._row_groups[device] for g in groups)
            self._tracked_params[device] = [p for _, p in items]
            for (_, p), row in zip(items, rows, strict=True):
                self._rows[id(p)] = (device, row)
                old = old_rows.get(id(p)) if keep else None
                if old is not None:
                    stats.table[row] = old_stats[old[0]].table[old[1]]

    def _summed_over(self, name: str, p: Tensor) -> tuple[Any, ...]:
        groups = self._zero.group.get(id(p))
        return groups if groups is not None else _summing_groups(name, p)

    def _check_params_known(self, cached: bool = True) -> None:
        """Tensors put into the param groups behind the optimizer's back: DeepSpeed ZeRO-1/2's flat partitions
        mapped back to the parameters (:mod:`.zero`); others adopted where each takes the place of one of the same
        shape (accelerate's FSDP2 ``prepare`` swaps the parameters for their DTensors), refused otherwise: the
        forces of an unknown tensor cannot be attributed to the parameters it was given, and must never read as
        zeros. (Checked when a group's parameter list is a new object, so a step pays one tuple comparison.)"""
        lists = tuple(id(group["params"]) for group in self.param_groups)
        if cached and lists == self._known_lists:
            return
        adopted = False
        for g, group in enumerate(self.param_groups):
            params = group["params"]
            if all(id(p) in self._names or self._zero.knows(p) for p in params):
                continue
            if self._map_partitions([p for p in params if id(p) not in self._names]):
                continue
            before = self._group_shapes[g] if g < len(self._group_shapes) else []
            if len(before) == len(params) and all(
                id(p) in self._names or tuple(p.shape) == shape for p, (_, shape) in zip(params, before, strict=True)
            ):  # the same parameters, re-wrapped: they keep their names
                for p, (old, _) in zip(params, before, strict=True):
                    if id(p) not in self._names:
                        self._names[id(p)] = self._names[old]
                        if old in self._generic:
                            self._generic.add(id(p))
                adopted = True
                continue
            unknown = [p for p in params if id(p) not in self._names]
            shapes = ", ".join(str(tuple(p.shape)) for p in unknown[:3])
            refuse_unmappable(self._given, type(self).__name__, self._ELEMENTWISE)
            raise RuntimeError(
                f"{type(self).__name__}: param_groups[{g}] holds {len(unknown)} tensor(s) it was never given "
                f"(shapes {shapes}), not in the places of same-shaped parameters: the parameters were replaced "
                "after construction by something else, without a map back to the parameters (DeepSpeed ZeRO-1/2's "
                "flat partitions carry one, and are mapped), so forces measured on them would not be your "
                "parameters' and nothing is reported rather than zeros. What works: DeepSpeed ZeRO stages 0, 1 and "
                "2, torch DDP, FSDP2 or any DTensor mesh (HF Trainer and accelerate included); or pass track=False "
                "to train without measuring."
            )
        if len(self.param_groups) == len(self._given):  # not DeepSpeed's one-group view of a step
            self._group_shapes = [[(id(p), tuple(p.shape)) for p in group["params"]] for group in self.param_groups]
        self._known_lists = lists
        if adopted:
            self._rebuild_tracking(keep=False)

    def _map_partitions(self, unknown: list[Tensor]) -> bool:
        """Map DeepSpeed's flat partitions among ``unknown`` to the parameters (all of them, or False). Their rows
        stay; each now measures its slice of this rank's partition and sums over DeepSpeed's data-parallel group."""
        if not self._ELEMENTWISE or not all(p.dim() == 1 for p in unknown):
            return False
        parts = [map_partition(flat, self._given, type(self).__name__) for flat in unknown]
        if any(part is None for part in parts):
            return False
        for part in parts:
            self._zero.partitions[id(part.flat)] = part
            for key, view in zip(part.keys, part.views, strict=True):
                if key is None:
                    continue
                self._zero.view[id(key)] = view
                self._zero.group[id(key)] = dp_groups(key)
                where = self._rows.get(id(key))
                if where is None:
                    continue
                device, row = where
                self._row_groups[device][row] = self._summed_over(self._names[id(key)], key)
                table = self._stats[device].table
                if table[row, START_KNOWN] > 0:  # a read before: the interval starts from this rank's slice
                    table[row, START_W_SQ] = sq_norms_on([view], device)[0].to(table)
        for device, row_groups in self._row_groups.items():
            self._sum_groups[device] = _distinct(g for groups in row_groups for g in groups)
        return True

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

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; every param group carries the call counter as ``"track_calls"``.

        The counter sets which calls ``track_every`` measures; carrying it makes a resumed run measure the steps an
        uninterrupted one would. It rides in the param groups because every checkpointer (torch.save, the HF
        Trainer, torch.distributed.checkpoint, torchtitan's flat DCP dicts, which restore the keys the live groups
        have) keeps group keys; ``torch.optim.AdamW`` loads such a dict and ignores it. Every group carries it, so
        groups stay alike (torch's state-dict tests compare them), and the live groups hold the value of the last
        save or load.
        """
        count = int(self._calls)
        for group in self.param_groups:
            group["track_calls"] = count
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") or []
        calls = next((g["track_calls"] for g in groups if g.get("track_calls") is not None), None)
        super().load_state_dict(state_dict)
        if calls is not None:  # absent in dicts saved by torch.optim.AdamW: the count goes on from here
            self._calls.fill_(int(calls))
        for group in self.param_groups:
            group["track_calls"] = int(self._calls)

    # ------------------------------------------------------------------ copies
    # Optimizer.__getstate__ keeps only defaults, state and param_groups; the tracking state (names, force tables,
    # counters) is carried beside them, per parameter in group order, because it is keyed by tensor identity.
    _CARRIED = ("_track", "_track_every", "_wd_schedule", "_lr_peak", "_created_lr", "_calls")

    def _portable_state(self, keep_filter: bool) -> dict[str, Any]:
        if self._zero:
            raise RuntimeError(
                f"{type(self).__name__} cannot be copied or pickled while DeepSpeed holds its parameters as flat "
                "partitions: save and restore through DeepSpeed (engine.save_checkpoint / load_checkpoint), which "
                "carries the optimizer's state and step count"
            )
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

    def __deepcopy__(self, memo: dict) -> ForceTracking:
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
        self._reset_host_caches()
        self._names, self._generic, self._rows, self._stats = {}, set(), {}, {}
        self._known_lists, self._group_shapes = None, []
        self._given, self._zero = [list(group["params"]) for group in self.param_groups], ZeroMap()
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
                f"lr_peak=<the schedule's maximum lr> to {type(self).__name__}, or set param_groups[i]['lr_peak']"
            )
        return wd * lr / peak

    # ------------------------------------------------------------------ recording
    def _record_unmeasured(self, params: list[Tensor], skip: Tensor | None) -> None:
        """Count a step that moved tracked tensors without measuring them (their residual cannot close)."""
        by_device: dict[torch.device, list[int]] = {}
        for p in params:
            where = self._rows.get(id(p))
            if where is not None:
                by_device.setdefault(where[0], []).append(where[1])
        for device, rows in by_device.items():
            self._stats[device].record_unmeasured(tuple(rows), skip)

    def _record(
        self, params: list[Tensor], reductions, lr, weight_decay, skip: Tensor | None, mask=None, update_lr=None
    ) -> None:
        """Fold one step's reductions (``{index in params: [⟨W,u⟩, ‖u‖², ‖W‖²]}``, or :class:`StackedReductions`)
        into the device tables.

        ``lr`` and ``weight_decay`` are the decay's (per-step shrink η·λ); ``update_lr`` the step size of the update
        direction u when it differs from ``lr``: with stacked reductions, one value per row (Muon's shape-adjusted
        lr; floats, or tensors that stay on the device). ``skip`` (0-d) drops the step (GradScaler found inf);
        ``mask`` (0-d bool) says whether to measure it (``track_every`` under compile)."""
        if isinstance(reductions, StackedReductions):  # one device, already stacked in row order of positions
            device, _ = self._rows[id(params[reductions.positions[0]])]
            rows = tuple(self._rows[id(params[i])][1] for i in reductions.positions)
            step_lr = None if update_lr is None else _per_row(update_lr, device)
            values = forces_from_reductions(reductions.values.to(device), lr, weight_decay, update_lr=step_lr)
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

        With DTensor parameters (FSDP2, tensor parallel, HSDP, any mesh) every rank must call it: the per-shard
        partial sums are combined with **one** all-reduce per process group that shards some tracked tensor (one
        per mesh dimension: FSDP2 one, FSDP2 × TP two, HSDP one), for all tensors at once, and every rank gets the
        global values.
        """
        names: list[str] = []
        tables, w_now = [], []
        for device, stats in self._stats.items():
            if not stats.names:
                continue
            # DeepSpeed's parameters: their slices of this rank's partition (the weights the update acts on)
            local = [self._zero.view.get(id(p)) for p in self._tracked_params[device]]
            local = [
                local_tensor(p) if v is None else v for p, v in zip(self._tracked_params[device], local, strict=True)
            ]
            real = [torch.view_as_real(p) if p.is_complex() else p for p in local]
            w_sq = sq_norms_on(real, device)  # float64: the residual is a small difference
            packed = torch.cat((stats.table, w_sq[:, None]), dim=1)
            if self._sum_groups[device]:
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
        """Sum each DTensor row's additive columns over the groups of its sharded mesh dimensions: one all-reduce
        per group, in which rows not sharded over that group take no part (they keep their values). A row
        replicated over a dimension is not summed over it (every rank there holds the same value); the per-step
        hyperparameters and counters stay local (identical on every rank)."""
        import torch.distributed as dist

        cols = torch.tensor(additive_columns() + [True], device=device)
        for group in self._sum_groups[device]:
            rows = torch.tensor([any(g is group for g in gs) for gs in self._row_groups[device]], device=device)
            take = rows[:, None] & cols[None, :]
            contrib = torch.where(take, packed, torch.zeros_like(packed))
            dist.all_reduce(contrib, group=group)
            packed = torch.where(take, contrib, packed)
        return packed

    def last_forces(self) -> ForceReadout:
        """Like :meth:`read_forces` without resetting the interval; ``.to_dict()`` gives the last step."""
        return self.read_forces(reset=False)


def _disambiguate(name: str, taken: set[str], where: str) -> str:
    """``name#1`` (``#2``, ...) for a name another tensor already has, with a warning that says so."""
    n = 1
    while f"{name}#{n}" in taken:
        n += 1
    warnings.warn(
        f"{where}: the parameter name {name!r} is already another tensor's; this one is reported as "
        f"'{name}#{n}'. Pass unique names (e.g. each module's named_parameters(prefix=...)) to choose them.",
        stacklevel=4,
    )
    return f"{name}#{n}"


def _per_row(values: list, device: torch.device) -> Tensor:
    """Per-row step sizes as one float64 [k] tensor on ``device``; tensor lrs (capturable use) stay on the device."""
    if all(not isinstance(v, Tensor) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float64).to(device)
    return torch.stack([torch.as_tensor(v).to(device, torch.float64).reshape(()) for v in values])


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
