"""``InstrumentedAdamW``: ``torch.optim.AdamW`` that measures the force budget of ‖W‖² every step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach, _use_grad_for_differentiable

from .forces import ForceReadout, ForceStats, additive_columns, forces_from_reductions
from .functional import Arena, delegated_adamw, multi_tensor_adamw, single_tensor_adamw
from .reductions import dot_f64

WEIGHT_DECAY_SCHEDULES = ("lr", "lr_squared")

try:  # FSDP2 parameters are DTensors; plain torch builds without distributed support have none
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Shard = None  # type: ignore[assignment,misc]


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

    Update paths: single-tensor and foreach mirror torch's op for op (bitwise equal). ``fused=True`` on CUDA runs
    our single-pass Triton kernel (``triton_adamw``): update and reductions in one read of p, g, m, v, with
    parameters within fp32 rounding of torch's fused AdamW (not bitwise: fp32 math in another order). Elsewhere,
    and for capturable/differentiable without fused, torch's own functional AdamW does the update and a post-pass
    takes the reductions (bitwise equal).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused: as
            :class:`torch.optim.AdamW` (same positions and defaults). ``model.named_parameters()`` keeps the names;
            otherwise tensors are named ``group{g}.param{i}``.
        track (bool): measure forces (default: True). With False this is plain AdamW.
        track_every (int): measure every N-th ``step()`` call (default: 1). Interval sums then cover only the
            measured steps; ``steps`` in the read-out says how many.
        track_filter (Callable[[str], bool], optional): which tensor names to measure (default: all).
        weight_decay_schedule (str): ``"lr"`` (torch's decoupled decay, per-step shrink ηλ) or ``"lr_squared"``
            (λ_t = λ·η_t/η_max, per-step shrink ∝ η², after Chou, arXiv 2512.08217). η_max is the group's
            ``initial_lr`` when an LR scheduler set it, else the lr the group was created with.
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
    ) -> None:
        if not isinstance(track_every, int) or isinstance(track_every, bool) or track_every < 1:
            raise ValueError(f"Invalid track_every: {track_every!r} (a positive int, 1 = every step)")
        if weight_decay_schedule not in WEIGHT_DECAY_SCHEDULES:
            raise ValueError(
                f"Invalid weight_decay_schedule: {weight_decay_schedule!r}; choose one of {WEIGHT_DECAY_SCHEDULES}"
            )
        if track_filter is not None and not callable(track_filter):
            raise TypeError(f"track_filter must be a callable name -> bool, got {type(track_filter).__name__}")
        # Set before super().__init__, which calls add_param_group for every group.
        self._track = bool(track)
        self._track_every = track_every
        self._track_filter = track_filter
        self._wd_schedule = weight_decay_schedule
        self._rows: dict[int, tuple[torch.device, int]] = {}
        self._sharded_rows: dict[torch.device, list[bool]] = {}  # rows whose tensor is a DTensor shard
        self._shard_group = None  # process group of the DTensor parameters (one 1-D mesh)
        self._stats: dict[torch.device, ForceStats] = {}
        self._tracked_params: dict[torch.device, list[Tensor]] = {}
        self._arena = Arena()
        self._calls = 0
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
        super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        group = self.param_groups[g]
        self._set_peak_lr(group)
        names = group.get("param_names") or [f"group{g}.param{i}" for i in range(len(group["params"]))]
        new: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for name, p in zip(names, group["params"], strict=True):
            if self._track_filter is None or self._track_filter(name):
                new.setdefault(p.device, []).append((name, p))
        for device, items in new.items():
            stats = self._stats.setdefault(device, ForceStats(device))
            rows = stats.add_rows([n for n, _ in items])
            self._sharded_rows.setdefault(device, []).extend(self._check_sharded(n, p) for n, p in items)
            self._tracked_params.setdefault(device, []).extend(p for _, p in items)
            for (_, p), row in zip(items, rows, strict=True):
                self._rows[id(p)] = (device, row)

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

    @staticmethod
    def _set_peak_lr(group: dict[str, Any]) -> None:
        lr = group["lr"]
        group.setdefault("lr_peak", float(lr) if not isinstance(lr, Tensor) else None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict goes through here; groups saved by torch.optim.AdamW have no "lr_peak".
        super().__setstate__(state)
        for group in self.param_groups:
            self._set_peak_lr(group)

    @property
    def tracked_names(self) -> list[str]:
        return [n for stats in self._stats.values() for n in stats.names]

    def tracked_parameters(self) -> list[tuple[str, Tensor]]:
        """(name, parameter) of every tracked tensor, in the row order of :meth:`read_forces`."""
        out = []
        for device, stats in self._stats.items():
            out.extend(zip(stats.names, self._tracked_params[device], strict=True))
        return out

    def _effective_weight_decay(self, group: dict[str, Any]):
        wd = group["weight_decay"]
        if self._wd_schedule == "lr":
            return wd
        lr = group["lr"]
        peak = group.get("initial_lr", group.get("lr_peak"))
        if isinstance(lr, Tensor) or isinstance(peak, Tensor) or peak is None:
            raise ValueError(
                "weight_decay_schedule='lr_squared' needs float learning rates (a tensor lr would need a host "
                "sync to scale the decay); pass lr as a float"
            )
        if peak <= 0:
            raise ValueError(f"weight_decay_schedule='lr_squared' needs a positive peak lr, got {peak}")
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

        self._calls += 1
        measuring = self._track and (self._calls - 1) % self._track_every == 0
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
            lr = group["lr"]
            weight_decay = self._effective_weight_decay(group)
            # DTensor shards: AdamW is elementwise, so updating each local shard in place is the sharded update;
            # the reductions become per-shard partial sums.
            local = [[_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
            lists = (*local, state_steps, tracked)
            common = dict(
                amsgrad=group["amsgrad"], lr=lr, weight_decay=weight_decay, eps=group["eps"], maximize=group["maximize"]
            )

            path = self._path(group, local[0])
            arena = self._arena if params[0].device.type == "cpu" else None
            if path == "triton":
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
                self._record(params, reductions, lr, weight_decay, skip)  # original params: rows are keyed by id
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

    def _path(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """Same choice as ``torch.optim.adam.adam``. ``fused=True`` on CUDA runs our single-pass Triton kernel
        (update + reductions); elsewhere fused, capturable and differentiable delegate to torch's own update."""
        if (
            group["fused"]
            and not group["differentiable"]
            and self._triton_device(params[0].device)
            and all(p.is_contiguous() and not p.is_complex() for p in params)
        ):
            return "triton"
        if group["fused"] or group["capturable"] or group["differentiable"]:
            return "delegated"
        foreach = group["foreach"]
        if foreach is None and group["fused"] is None:
            _, foreach = _default_to_fused_or_foreach(params, group["differentiable"], use_fused=False)
            if foreach and isinstance(group["lr"], Tensor):
                foreach = False
        return "foreach" if foreach else "single"

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

    def _record(self, params: list[Tensor], reductions, lr, weight_decay, skip: Tensor | None) -> None:
        by_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        for i, red in reductions.items():
            device, row = self._rows[id(params[i])]
            rows, reds = by_device.setdefault(device, ([], []))
            rows.append(row)
            reds.append(red.to(device))
        for device, (rows, reds) in by_device.items():
            values = forces_from_reductions(torch.stack(reds), lr, weight_decay)
            self._stats[device].record(tuple(rows), values, skip)

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
            w_sq = torch.stack([dot_f64(r, r) for r in real])
            packed = torch.cat((stats.table, w_sq[:, None]), dim=1)
            if any(self._sharded_rows[device]):
                packed = self._combine_shards(packed, device)
            host = packed.cpu().numpy()
            names.extend(stats.names)
            tables.append(host[:, :-1])
            w_now.append(host[:, -1])
            if reset:
                stats.reset_interval()
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
