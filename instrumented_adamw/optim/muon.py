r"""``InstrumentedMuon``: ``torch.optim.Muon`` that measures the force budget of ‖W‖² every step.

Muon's update has AdamW's shape, ``W₊ = (1 − ηλ)W − η_u·O``, with O the Newton–Schulz orthogonalised (Nesterov)
momentum and η_u = η adjusted to the matrix shape by ``adjust_lr_fn``. So the same exact split holds with û → O:

.. math::
    ‖W₊‖² − ‖W‖² = \underbrace{−2η_u⟨W,O⟩}_{align} + \underbrace{η_u²‖O‖²}_{inject}
                  + \underbrace{−2ηλ‖W‖²}_{decay} + \underbrace{2η_u ηλ⟨W,O⟩ + (ηλ)²‖W‖²}_{higher\ order}

The reductions are taken from the O the update actually used (torch computes it in bf16) and the pre-update W. The
read-out is :class:`~instrumented_adamw.optim.tracking.ForceTracking`'s, shared with ``InstrumentedAdamW``: in it
``w_dot_u`` is ⟨W,O⟩, ``u_sq`` ‖O‖², ``lr`` the decay's η and ``update_lr`` η_u.

Sharded matrices (FSDP2, tensor parallel: DTensors) take torch's Muon step as it stands: Newton–Schulz runs on the
DTensors, whose operators gather what the matrix products need, so the update is the global one, bitwise
``torch.optim.Muon``'s on the same DTensors. The reductions are then taken on the local shards, with O laid out
as W (the redistribution the in-place update does anyway), and combined across ranks on read like AdamW's.

Muon orthogonalises matrices: it takes 2-D parameters only (hidden weights). Embeddings, the head, norms and
biases go to AdamW; :func:`hybrid_param_groups` makes the usual split and :class:`~instrumented_adamw.optim.hybrid.
HybridOptimizer` steps both as one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from instrumented_adamw.kernels.reductions import reduce3, reduction_dtype
from instrumented_adamw.optim.functional import StackedReductions
from instrumented_adamw.optim.sharding import is_dtensor, local_tensor
from instrumented_adamw.optim.tracking import ForceTracking

#: The torch release that ships ``torch.optim.Muon``.
MUON_TORCH = "2.9"

try:
    from torch.optim import Muon as _TorchMuon
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
except ImportError:  # torch < 2.9
    _TorchMuon = None

    def _adjust_lr(*args, **kwargs):  # noqa: D103 - never called: construction refuses first
        raise NotImplementedError

    _zeropower_via_newtonschulz = _adjust_lr


def _muon_base() -> type:
    if _TorchMuon is not None:
        return _TorchMuon

    class _Unavailable(torch.optim.Optimizer):
        def __init__(self, *args, **kwargs) -> None:
            raise ImportError(
                f"InstrumentedMuon needs torch.optim.Muon, which torch {torch.__version__} does not have: install "
                f"torch>={MUON_TORCH} (pip install 'torch>={MUON_TORCH}')"
            )

    return _Unavailable


class InstrumentedMuon(ForceTracking, _muon_base()):
    r"""Muon whose ``step()`` also measures, per tensor, why ‖W‖² changed (see the module docstring).

    Parameters and momentum buffers are bitwise equal to ``torch.optim.Muon`` with the same arguments (the update
    is torch's single-tensor Muon op for op, with its own Newton–Schulz and lr adjustment), and state dicts move
    both ways.

    Args:
        params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: as
            :class:`torch.optim.Muon` (same positions and defaults).
        track, track_every, track_filter, weight_decay_schedule, lr_peak: as :class:`InstrumentedAdamW`
            (``weight_decay_schedule="lr_squared"``: λ_t = λ·η_t/η_max, the decay ∝ η² that the corrected-decay
            paper argues stabilises the norm whatever the optimizer).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        track: bool = True,
        track_every: int = 1,
        track_filter: Callable[[str], bool] | None = None,
        weight_decay_schedule: str = "lr",
        lr_peak: float | None = None,
    ) -> None:
        if _TorchMuon is None:
            _muon_base()()  # raises: names the torch version needed
        self._init_tracking(
            track=track, track_every=track_every, track_filter=track_filter,
            weight_decay_schedule=weight_decay_schedule, lr_peak=lr_peak,
        )  # fmt: skip
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step (torch's, op for op) and, on tracked steps, its forces folded into the device tables."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measuring, mask = self._begin_step()
        for g_index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            lr = _to_scalar(group["lr"])
            weight_decay = self._effective_weight_decay(group, g_index)
            # Per device: positions in params, their reductions as rows of one float64 tensor (written in place,
            # recorded with one call) and their update lrs.
            measured: dict[torch.device, tuple[list[int], Tensor, list[Any]]] = {}
            for i, (param, grad, buf) in enumerate(zip(params, grads, bufs, strict=True)):
                if grad.ndim != 2:
                    raise ValueError("Param gradient must be a 2D matrix")  # torch's message
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], param.shape)
                if measuring and id(param) in self._rows:
                    if update.dtype != param.dtype and reduction_dtype(param.dtype) == param.dtype:
                        # Newton-Schulz returns bf16, transposed for tall matrices; add_ below would widen it to W's
                        # dtype internally anyway (exactly), so widening it once here, laid out as W, serves the
                        # reductions (one contiguous read) and the update alike, bitwise.
                        update = update.to(param.dtype, memory_format=torch.contiguous_format)
                    device = self._rows[id(param)][0]
                    if device not in measured:
                        table = torch.empty(len(params), 3, dtype=torch.float64, device=device)
                        measured[device] = ([], table, [])
                    positions, table, etas = measured[device]
                    if is_dtensor(param) and update.placements != param.placements:
                        # Laid out as W's shards (the in-place update below would do this itself): the local
                        # reductions are then W's shard against its own part of O, combined on read like AdamW's.
                        update = update.redistribute(param.device_mesh, param.placements)
                    # pre-update W, the O the update uses
                    reduce3(local_tensor(param), local_tensor(update), out=table[len(positions)])
                    positions.append(i)
                    etas.append(adjusted_lr)
                param.mul_(1 - lr * weight_decay)
                param.add_(update, alpha=-adjusted_lr)
            for positions, table, etas in measured.values():
                stacked = StackedReductions(positions, table[: len(positions)])
                self._record(params, stacked, lr, weight_decay, None, mask, update_lr=etas)
            if self._track and not measuring:
                self._record_unmeasured(params, None)
        return loss


def hybrid_param_groups(
    model: torch.nn.Module, roles=None
) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """The usual Muon + AdamW split of a model's parameters: (Muon's, AdamW's) as ``(name, parameter)`` lists.

    Muon takes the hidden 2-D matrices — attention (Q, K, V, fused QKV, output) and MLP weights; AdamW takes
    everything else: embeddings and the output head (2-D, but indexed or read out row by row, not transformed),
    norms and biases. Classes come from the taxonomy (``roles``: ``{name: ParamRole}``, default classified from
    the model's ``config.model_type``); a 2-D tensor the taxonomy cannot place goes to AdamW, the safe side.
    """
    from instrumented_adamw.taxonomy import classify_all

    named = list(model.named_parameters())
    if roles is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        roles = classify_all([n for n, _ in named], model_type)
    hidden = {"Transmission", "Selection", "QKV", "V"}
    muon, adamw = [], []
    for name, p in named:
        (muon if p.ndim == 2 and roles[name].cls in hidden else adamw).append((name, p))
    return muon, adamw
