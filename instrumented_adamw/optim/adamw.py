"""``InstrumentedAdamW``: ``torch.optim.AdamW`` that measures the force budget of ‖W‖² every step."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach, _to_scalar, _use_grad_for_differentiable

from instrumented_adamw.kernels import cpu_adamw
from instrumented_adamw.optim.functional import (
    Arena,
    StackedReductions,
    delegated_adamw,
    multi_tensor_adamw,
    single_tensor_adamw,
)
from instrumented_adamw.optim.sharding import any_dtensor, local_tensor
from instrumented_adamw.optim.tracking import WEIGHT_DECAY_SCHEDULES, ForceTracking, unwrap_optimizer

__all__ = ["WEIGHT_DECAY_SCHEDULES", "InstrumentedAdamW", "unwrap_optimizer"]

#: (device type, dtype) pairs already warned about: the kernel's probe found torch's fused kernel rounding elsewhere.
_WARNED_MISMATCH: set[tuple[str, torch.dtype]] = set()

#: Dtypes for which torch's single-tensor and foreach AdamW agree bitwise on CPU (tests/test_torch_optim_db.py).
_SAME_MATH_DTYPES = (torch.float32, torch.float64)


def _is_float(x) -> bool:
    """A host number (a tensor hyperparameter would need a host read to become a kernel argument)."""
    return isinstance(x, (int, float))


class _GroupStep(NamedTuple):
    """One param group's step: what every update path needs besides the group's tensor lists."""

    index: int
    group: dict[str, Any]
    # The tensors the force rows are keyed by: the group's parameters as given (DTensors stay DTensors), or for
    # DeepSpeed's flat partitions each slice's parameter (None for padding).
    params: list[Tensor | None]
    lr: float | Tensor
    weight_decay: float | Tensor
    beta1: float | Tensor
    beta2: float | Tensor
    has_complex: bool
    tracked: list[bool]
    mask: Tensor | None  # track_every under torch.compile: which steps count, decided on the device
    compiling: bool
    grad_scale: Tensor | None
    found_inf: Tensor | None
    arena: Arena | None  # CPU scratch buffers (eager CPU steps only)

    def common(self) -> dict[str, Any]:
        group = self.group
        return dict(amsgrad=group["amsgrad"], lr=self.lr, weight_decay=self.weight_decay, eps=group["eps"],
                    maximize=group["maximize"])  # fmt: skip


class InstrumentedAdamW(ForceTracking, torch.optim.AdamW):
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
    contiguous, without GradScaler); ``instrumented_adamw.kernels.cpu_adamw.status()`` says whether it is active. On
    CUDA
    it runs our single-pass Triton kernel (``triton_adamw``), whose update is torch's fused CUDA AdamW's arithmetic
    (docs/torch_fused_adamw.md), probed against it on the device at first use (where this torch build rounds
    elsewhere, torch's own fused kernel steps and a second pass measures). Elsewhere (no compiler, half precision,
    GradScaler, capturable/differentiable), torch's own functional AdamW does the update and a second pass takes the
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
        # Before super().__init__, which calls add_param_group for every group.
        self._init_tracking(
            track=track, track_every=track_every, track_filter=track_filter,
            weight_decay_schedule=weight_decay_schedule, lr_peak=lr_peak,
        )  # fmt: skip
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
        # The kernel's probe on CUDA runs now, eagerly: its first use may be inside torch.compile's tracing or a
        # CUDA-graph capture, where it could not run.
        for group in self.param_groups:
            cuda = [p for p in group["params"] if p.device.type == "cuda"]
            if group["fused"] and cuda and self._triton_device(cuda[0].device):
                self._triton_matches_torch(cuda)

    _CARRIED = ForceTracking._CARRIED + ("_kernel_launches",)
    _ELEMENTWISE = True

    def _reset_host_caches(self) -> None:
        self._arena = Arena()  # CPU scratch buffers, reused between steps
        self._plans: dict[tuple[int, torch.device, torch.dtype], Any] = {}  # Triton launch tables per group bucket

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
        measuring, mask = self._begin_step()
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
            g_index = self._zero.group_index(params, g_index)  # DeepSpeed steps one group at a time
            keys: list = params
            finish = cut = None
            if self._zero and self._whole_partitions(group, params):
                keys, cut = self._zero.cuts(params)
            elif self._zero:  # DeepSpeed ZeRO-1/2: each flat partition stepped as its parameters' slices
                lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
                lists, keys, state_steps, finish = self._zero.expand(lists, state_steps)
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = lists
            tracked = [measuring and id(k) in self._rows for k in keys]
            # DTensor shards: AdamW is elementwise, so updating each local shard in place is the sharded update;
            # the reductions become per-shard partial sums.
            local = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
            if any_dtensor(params):  # their grads and moments are DTensors too
                local = [[local_tensor(t) for t in ts] for ts in local]
            beta1, beta2 = group["betas"]
            how = _GroupStep(
                index=g_index, group=group, params=keys, lr=_to_scalar(group["lr"]),  # one-element tensor lr too
                weight_decay=self._effective_weight_decay(group, g_index), beta1=beta1, beta2=beta2,
                has_complex=has_complex, tracked=tracked, mask=mask, compiling=compiling, grad_scale=grad_scale,
                found_inf=found_inf, arena=self._arena if params[0].device.type == "cpu" and not compiling else None,
            )  # fmt: skip
            if cut is not None:  # torch's fused update of the flat partitions, reductions per slice
                flat_tracked = [any(tracked[k] for k, _, _ in cut[i]) for i in range(len(params))]
                cut = {i: [c for c in cut[i] if tracked[c[0]]] for i in range(len(params))}
                reductions, skip = self._update_delegated((*local, state_steps, flat_tracked), how, cut=cut)
            else:
                path = self._path(
                    group, local, scaled=grad_scale is not None or found_inf is not None, tracking=any(tracked)
                )
                reductions, skip = self._UPDATES[path](self, (*local, state_steps, tracked), how)
            if finish is not None:
                finish()
            if reductions:
                self._record(keys, reductions, how.lr, how.weight_decay, skip, mask)  # original params: rows by id
            elif self._track and not measuring:
                self._record_unmeasured(keys, skip)
        return loss

    # The five update paths, one signature (as torch's adamw picks _fused / _multi_tensor / _single_tensor): the
    # group's lists (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, tracked) and its
    # _GroupStep -> (the tracked tensors' reductions, the found_inf that skipped the step or None).
    def _update_cpu(self, lists: tuple, how: _GroupStep) -> tuple[Any, Tensor | None]:
        out = cpu_adamw.fused_adamw_cpu(*lists, beta1=how.beta1, beta2=how.beta2, **how.common())
        positions = [i for i, flag in enumerate(how.tracked) if flag]
        return StackedReductions(positions, out if len(positions) == len(how.tracked) else out[positions]), None

    def _update_triton(self, lists: tuple, how: _GroupStep) -> tuple[Any, Tensor | None]:
        # Eager steps with float η and λ fold their forces into the table inside the kernel's second launch (the
        # host's per-step work on small models); otherwise the reductions come back to _record.
        into = None
        if any(how.tracked) and how.mask is None and not how.compiling and _is_float(how.lr) \
                and _is_float(how.weight_decay):  # fmt: skip
            into = [self._rows[id(p)] if flag else None for p, flag in zip(how.params, how.tracked, strict=True)]
        reductions = self._triton_step(
            *lists, group_index=how.index, beta1=how.beta1, beta2=how.beta2, grad_scale=how.grad_scale,
            found_inf=how.found_inf, into=into, **how.common(),
        )  # fmt: skip
        return reductions, how.found_inf

    def _update_delegated(self, lists: tuple, how: _GroupStep, cut=None) -> tuple[Any, Tensor | None]:
        group = how.group
        reductions = delegated_adamw(
            *lists, has_complex=how.has_complex, beta1=how.beta1, beta2=how.beta2, foreach=group["foreach"],
            capturable=group["capturable"], differentiable=group["differentiable"], fused=group["fused"],
            grad_scale=how.grad_scale, found_inf=how.found_inf, arena=how.arena, cut=cut, **how.common(),
        )  # fmt: skip
        return reductions, how.found_inf

    def _update_foreach(self, lists: tuple, how: _GroupStep) -> tuple[Any, Tensor | None]:
        reductions = multi_tensor_adamw(
            *lists, has_complex=how.has_complex, beta1=how.beta1, beta2=how.beta2, arena=how.arena, **how.common()
        )
        return reductions, None

    def _update_single(self, lists: tuple, how: _GroupStep) -> tuple[Any, Tensor | None]:
        return single_tensor_adamw(*lists, beta1=how.beta1, beta2=how.beta2, **how.common()), None

    _UPDATES = {
        "cpu": _update_cpu,
        "triton": _update_triton,
        "delegated": _update_delegated,
        "foreach": _update_foreach,
        "single": _update_single,
    }

    def _whole_partitions(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """Whether DeepSpeed's flat partitions of this group are updated whole: torch's fused CPU kernel treats the
        last elements of a tensor apart from the rest (scalar tail vs vector body, which round differently), so
        only the update of the whole flat tensor is bitwise DeepSpeed's. Elsewhere each slice is updated on its
        own (elementwise paths, the same values; CUDA's single-pass kernel)."""
        return bool(group["fused"]) and all(p.device.type == "cpu" and self._zero.knows(p) for p in params)

    #: Devices where torch has the fused kernel ours reproduces, so that it is probed against it before serving.
    _PROBED_DEVICES = ("cuda",)

    def _triton_matches_torch(self, params: list[Tensor]) -> bool:
        """Whether the kernel's update is ``torch.optim.AdamW(fused=True)``'s bitwise for these tensors' device and
        dtypes (probed once each; :func:`~instrumented_adamw.kernels.triton_adamw.mismatch_with_torch`). Where it
        is not, fused steps run torch's own kernel and a second pass takes the reductions: slower, never wrong."""
        device = params[0].device
        if device.type not in self._PROBED_DEVICES:
            return True
        from instrumented_adamw.kernels.triton_adamw import mismatch_with_torch

        for dtype in {p.dtype for p in params}:
            reason = mismatch_with_torch(device, dtype)
            if reason is not None:
                if (device.type, dtype) not in _WARNED_MISMATCH:
                    _WARNED_MISMATCH.add((device.type, dtype))
                    warnings.warn(
                        f"InstrumentedAdamW(fused=True) on {device} {dtype}: its single-pass kernel is not used, as "
                        f"{reason}. Steps run torch's fused kernel (bitwise torch.optim.AdamW(fused=True)) and the "
                        "reductions take a second pass (slower).",
                        stacklevel=5,
                    )
                return False
        return True

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
            and self._triton_matches_torch(params)
        ):
            return "triton"
        # Compiled with default flags on CPU: Inductor cannot fuse the reductions into the traced update (two passes),
        # while the kernel is one pass. Parameters are then torch's fused AdamW's bitwise,
        # within fp32 rounding of compiled torch AdamW's (which differs from eager torch's anyway); foreach=False
        # keeps the traced update, bitwise compiled torch. docs/benchmarks.md has the figures. Only fused=True asked
        # for the kernel, so only it warns when the kernel is missing.
        compiled_default = torch.compiler.is_compiling() and group["fused"] is None and group["foreach"] is None
        if (
            (group["fused"] or compiled_default)
            and tracking
            and not scaled
            and self._cpu_kernel_fits(group, local, warn=bool(group["fused"]))
        ):
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
    def _cpu_kernel_fits(group: dict[str, Any], local: list[list[Tensor]], *, warn: bool) -> bool:
        """Whether ``cpu_adamw`` can do this group's fused step bitwise as torch would: contiguous CPU tensors of a
        dtype it serves and float hyperparameters. GradScaler's scale and found_inf, differentiable and tensor
        hyperparameters stay with torch's own update. ``capturable`` is no reason: torch's fused CPU kernel ignores
        it, and torch.compile sets it on every group while it traces ``step()``."""
        params = local[0]  # then grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
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
        return all(cpu_adamw.serves(d, warn) for d in {str(p.dtype).removeprefix("torch.") for p in params})

    def _triton_step(
        self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, tracked, *, group_index, amsgrad,
        beta1, beta2, lr, weight_decay, eps, maximize, grad_scale, found_inf, into=None,
    ):  # fmt: skip
        """One launch pair per (device, dtype) bucket of a group; steps stay on the device (no host sync).

        ``into`` (each tensor's (device, row) in the force tables, None where not measured): the second launch
        records the step into the table itself and nothing comes back for those rows. Otherwise, or for a bucket
        whose table is elsewhere, the kernel's [T, 3] rows come back stacked (several dtype buckets on one device
        concatenated). The common case, one bucket per group, passes the lists as they are: per-tensor Python here
        (views, copies, row indexing, the table update's small ops) was most of a small model's step."""
        from instrumented_adamw.kernels.triton_adamw import RecordInto, fused_adamw_reduce

        torch._foreach_add_(state_steps, 1)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        measured: list[StackedReductions] = []
        for (device, dtype), idx in buckets.items():
            whole = len(idx) == len(params)

            def pick(xs, idx=idx, whole=whole):
                return xs if whole else [xs[i] for i in idx]

            grads_b = [g if g.is_contiguous() else g.contiguous() for g in pick(grads)]
            steps_b = pick(state_steps)
            if any(s.device != device for s in steps_b):
                steps_b = [s.to(device) for s in steps_b]
            steps = torch.stack(steps_b).to(torch.float32)
            key = (group_index, device, dtype)
            record = None
            if into is not None and device in self._stats:
                places = pick(into)
                if all(place is None or place[0] == device for place in places):
                    stats = self._stats[device]
                    rows = stats.row_index(tuple(-1 if place is None else place[1] for place in places))
                    record = RecordInto(stats.table, rows, float(lr), float(weight_decay))
            red, self._plans[key] = fused_adamw_reduce(
                pick(params), grads_b, pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else [],
                steps, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
                maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, plan=self._plans.get(key),
                record=record,
            )  # fmt: skip
            self._kernel_launches += 1
            if grad_scale is not None:  # the kernel wrote the unscaled gradients into the contiguous copies
                for g, copy in zip(pick(grads), grads_b, strict=True):
                    if copy is not g:
                        g.copy_(copy)
            keep = [j for j, i in enumerate(idx) if tracked[i]]
            if keep and record is None:
                measured.append(StackedReductions([idx[j] for j in keep], red if len(keep) == len(idx) else red[keep]))
        if found_inf is not None:  # a skipped step does not count, as in torch's fused AdamW
            torch._foreach_sub_(state_steps, [found_inf.to(s.device) for s in state_steps])
        if len(measured) == 1:
            return measured[0]
        if len({m.values.device for m in measured}) == 1:  # several dtypes on one device: still one record
            positions = [i for m in measured for i in m.positions]
            return StackedReductions(positions, torch.cat([m.values for m in measured]))
        return {i: row for m in measured for i, row in zip(m.positions, m.values.unbind(), strict=True)}
