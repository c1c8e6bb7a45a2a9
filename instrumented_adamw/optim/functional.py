"""AdamW update paths that also return the force reductions of every tracked tensor.

Three implementations with one signature, as in ``torch/optim/adam.py``:

* :func:`single_tensor_adamw` -- the readable specification. The update mirrors torch's single-tensor AdamW op
  for op, so parameters and state are bitwise equal to ``torch.optim.AdamW(foreach=False)``.
* :func:`multi_tensor_adamw` -- mirrors torch's foreach AdamW op for op and reuses its denominator
  ``√v̂ + ε`` to form û, instead of recomputing it.
* :func:`delegated_adamw` -- for ``fused``, ``capturable`` and ``differentiable``: the update is torch's own
  functional ``adam`` (so equality is by construction); W is snapshotted first and the reductions are taken from
  the snapshot and the stored moments afterwards.

Every path computes, for each tracked tensor, from the **pre-update** weights W and û = m̂/(√v̂+ε) (v̂ the AMSGrad
running max when enabled; the moments as stored after this step's update, in at least fp32 arithmetic)::

    [⟨W,û⟩, ‖û‖², ‖W‖²]      (float64, on the parameter's device, no host synchronisation)

Complex parameters are reduced on their real view, which is what ‖W‖² of the complex tensor needs.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import Optimizer, _get_value, _view_as_real

from instrumented_adamw.kernels.reductions import reduce3, reduction_dtype

Reductions = dict[int, Tensor]
"""Maps the index of a tensor in ``params`` to its ``[⟨W,û⟩, ‖û‖², ‖W‖²]`` vector."""


class StackedReductions(NamedTuple):
    """The reductions of ``params[i]`` for each ``i`` in ``positions``, as the rows of one float64 [n, 3] tensor on
    one device: what a multi-tensor kernel returns, recorded without splitting it into a tensor per parameter."""

    positions: list[int]
    values: Tensor


class Arena:
    """Reusable flat buffers per (device, dtype, role).

    Why: on CPU a fresh parameter-sized temporary costs its page faults every step (torch's CPU allocator returns
    large blocks to the OS), more than the arithmetic (docs/benchmarks.md). Keeping the intermediates between steps
    makes tracking cheaper than torch's own foreach step. On CUDA the caching allocator already recycles memory, so
    no arena is used there.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}

    def flat(self, role: str, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype, role)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, device=device, dtype=dtype)
            self._buffers[key] = buf
        return buf[:numel]

    def like(self, role: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """A view shaped like ``t`` in ``dtype``; one buffer per role is reused (and grown) across tensors."""
        return self.flat(role, t.numel(), t.device, dtype).view(t.shape)

    def views(self, role: str, like: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
        """Contiguous views, one shaped like each tensor of ``like``, packed into one buffer."""
        if not like:
            return []
        dtype = dtype or like[0].dtype
        flat = self.flat(role, sum(t.numel() for t in like), like[0].device, dtype)
        out, offset = [], 0
        for t in like:
            out.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        return out


def _uhat_raw(exp_avg: Tensor, denom: Tensor | None, vhat: Tensor, bc2_sqrt, eps: float, out=None) -> Tensor:
    """m / (√v̂/√bc2 + ε): û times the first-moment bias correction bc1, written into ``out`` when given.

    For fp32/fp64 parameters the update's own denominator is reused. For half/bf16 parameters torch rounds the
    denominator to 8 bits, so û is recomputed from the stored moments in fp32: the forces then describe AdamW's
    intended step, and what low-precision arithmetic did differently shows up in the rounding residual. The
    delegated path has no denominator to reuse (``denom=None``) and recomputes it the same way.
    """
    dtype = reduction_dtype(exp_avg.dtype)
    if denom is not None and dtype == exp_avg.dtype:
        return exp_avg / denom if out is None else torch.div(exp_avg, denom, out=out)
    if out is None:
        out = torch.empty(exp_avg.shape, dtype=dtype, device=exp_avg.device)
    torch.sqrt(vhat.to(dtype), out=out)
    out.div_(bc2_sqrt).add_(eps)
    return torch.div(exp_avg.to(dtype), out, out=out)


def _scaled(red: Tensor, bc1) -> Tensor:
    """Reductions of m/(√v̂/√bc2+ε) -> reductions of û, dividing by the bias correction bc1 (float or tensor).

    Python floats enter the kernels as scalar arguments, so nothing is copied host-to-device.
    """
    if isinstance(bc1, Tensor):
        bc1 = bc1.to(torch.float64)
    return torch.stack((red[0] / bc1, red[1] / (bc1 * bc1), red[2]))


def single_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    tracked: list[bool],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    eps: float,
    maximize: bool,
) -> Reductions:
    """The specification: torch's single-tensor AdamW, plus the reductions, one tensor at a time."""
    out: Reductions = {}
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        exp_avg_sq = exp_avg_sqs[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        step_t = state_steps[i]

        step_t += 1

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            if amsgrad:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
            param = torch.view_as_real(param)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        step = _get_value(step_t)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5

        if amsgrad:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            vhat = max_exp_avg_sq
        else:
            vhat = exp_avg_sq
        denom = (vhat.sqrt() / bias_correction2_sqrt).add_(eps)

        # Reductions use W *before* this step's decay and update (torch decays first; the order of these
        # independent in-place ops does not change any value).
        if tracked[i]:
            u = _uhat_raw(exp_avg, denom, vhat, bias_correction2_sqrt, eps)
            out[i] = _scaled(reduce3(param, u), bias_correction1)

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.addcdiv_(exp_avg, denom, value=-step_size)  # type: ignore[arg-type]
    return out


def multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    tracked: list[bool],
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    arena: Arena | None = None,
) -> Reductions:
    """torch's foreach AdamW (non-capturable) op for op; û reuses the foreach denominator.

    With an ``arena`` (CPU), the denominator and û are written into buffers kept between steps instead of fresh
    allocations; the values are the same.
    """
    out: Reductions = {}
    if not params:
        return out
    if isinstance(lr, Tensor):
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")

    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],  # type: ignore[list-item]
        with_indices=True,
    )
    for (
        device_params_,
        device_grads_,
        device_exp_avgs_,
        device_exp_avg_sqs_,
        device_max_exp_avg_sqs_,
        device_state_steps_,
    ), indices in grouped.values():
        device_params = cast(list[Tensor], device_params_)
        device_grads = cast(list[Tensor], device_grads_)
        device_exp_avgs = cast(list[Tensor], device_exp_avgs_)
        device_exp_avg_sqs = cast(list[Tensor], device_exp_avg_sqs_)
        device_state_steps = cast(list[Tensor], device_state_steps_)
        device_max_exp_avg_sqs = cast(list[Tensor], device_max_exp_avg_sqs_) if amsgrad else []
        positions = list(indices)  # where each bucket entry sits in ``params``

        if has_complex:
            if amsgrad:
                _view_as_real(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_max_exp_avg_sqs)
            else:
                _view_as_real(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs)

        if maximize:
            device_grads = torch._foreach_neg(device_grads)  # type: ignore[assignment]

        if device_state_steps[0].is_cpu:
            torch._foreach_add_(device_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(device_state_steps, 1)

        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        del device_grads

        bias_correction1 = [1 - beta1 ** _get_value(step) for step in device_state_steps]
        bias_correction2 = [1 - beta2 ** _get_value(step) for step in device_state_steps]
        step_size = [-(lr / bc) for bc in bias_correction1]
        bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]

        if amsgrad:
            torch._foreach_maximum_(device_max_exp_avg_sqs, device_exp_avg_sqs)
            vhats = device_max_exp_avg_sqs
        else:
            vhats = device_exp_avg_sqs
        if arena is None:
            denoms = torch._foreach_sqrt(vhats)
        else:
            denoms = arena.views("denom", vhats)
            for v, d in zip(vhats, denoms, strict=True):
                torch.sqrt(v, out=d)
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        torch._foreach_add_(denoms, eps)

        # Reductions on the pre-update W, before the decay and the step below touch it.
        todo = [k for k, pos in enumerate(positions) if tracked[pos]]
        for k in todo:
            m = device_exp_avgs[k]
            buf = arena.like("uhat", m, reduction_dtype(m.dtype)) if arena is not None else None
            u = _uhat_raw(m, denoms[k], vhats[k], bias_correction2_sqrt[k], eps, out=buf)
            out[positions[k]] = _scaled(reduce3(device_params[k], u), bias_correction1[k])

        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(device_params, device_exp_avgs, denoms, step_size)  # type: ignore[arg-type]
    return out


def delegated_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    tracked: list[bool],
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    foreach: bool | None,
    capturable: bool,
    differentiable: bool,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    arena: Arena | None = None,
    cut: dict[int, list[tuple[int, int, int]]] | None = None,
) -> Reductions:
    """torch's own functional AdamW does the update; reductions come from a snapshot of W taken just before.

    ``cut`` (DeepSpeed's flat partitions, :mod:`.zero`): tensor ``i``'s reductions are taken per slice ``(position,
    start, numel)`` of it instead, keyed by position.

    Costs one copy of the tracked weights plus one pass over (W, m, v) after the step. Bias corrections are taken
    from the step tensors on the device, so nothing synchronises with the host and CUDA-graph capture stays valid.
    A step skipped through ``found_inf`` still yields reductions here; the caller discards them on the device.
    """
    todo = [i for i, flag in enumerate(tracked) if flag]
    with torch.no_grad():
        real = [torch.view_as_real(params[i]) if torch.is_complex(params[i]) else params[i] for i in todo]
        if arena is not None and real:
            snaps = arena.views("snapshot", [r.detach() for r in real])
            for r, s in zip(real, snaps, strict=True):
                s.copy_(r.detach())
        else:
            snaps = [r.detach().clone() for r in real]

    torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=foreach,
        capturable=capturable,
        differentiable=differentiable,
        fused=fused,
        grad_scale=grad_scale,
        found_inf=found_inf,
        has_complex=has_complex,
        decoupled_weight_decay=True,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )

    out: Reductions = {}
    with torch.no_grad():
        b1 = float(beta1) if not isinstance(beta1, Tensor) else beta1.detach().double()
        b2 = float(beta2) if not isinstance(beta2, Tensor) else beta2.detach().double()
        for i, snap in zip(todo, snaps, strict=True):
            m, v = exp_avgs[i].detach(), (max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i]).detach()
            if torch.is_complex(m):
                m, v = torch.view_as_real(m), torch.view_as_real(v)
            buf = arena.like("uhat", m, reduction_dtype(m.dtype)) if arena is not None else None
            step = state_steps[i].detach().to(device=m.device, dtype=torch.float64)
            if isinstance(b1, Tensor):
                b1, b2 = b1.to(m.device), b2.to(m.device)
            bc1 = 1 - b1**step
            bc2_sqrt = (1 - b2**step).sqrt().to(reduction_dtype(m.dtype))
            u = _uhat_raw(m, None, v, bc2_sqrt, eps, out=buf)
            if cut is None:
                out[i] = _scaled(reduce3(snap, u), bc1)
                continue
            for position, start, numel in cut[i]:
                out[position] = _scaled(reduce3(snap.narrow(0, start, numel), u.narrow(0, start, numel)), bc1)
    return out
