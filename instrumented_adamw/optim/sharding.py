"""DTensor parameters (FSDP2, tensor parallel, HSDP, any mesh): their local shards, and the process groups over which
a shard's element sums add up to the tensor's."""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor


def _dtensor_class():
    """``DTensor``, if anything has imported it: no DTensor can exist before (FSDP2, TP and DCP import it), and
    importing it here would cost every user a second of start-up."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t):
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def any_dtensor(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor: the per-step check that lets plain tensors skip ``local_tensor``."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _summing_groups(name: str, p: Tensor) -> tuple[Any, ...]:
    """The process groups over which a tensor's element sums add up: those of the mesh dimensions it is sharded on
    (``Shard``, ``_StridedShard``), in mesh order; none for a plain tensor or one replicated everywhere. A
    ``Partial`` parameter holds pending sums an elementwise update cannot act on: refused."""
    if not is_dtensor(p):
        return ()
    from torch.distributed.tensor.placement_types import Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard  # FSDP2 x TP's dp dimension
    except ImportError:  # pragma: no cover - older torch: no strided shards
        _StridedShard = Shard
    groups = []
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            groups.append(p.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(
                f"{name}: DTensor placement {placement} on mesh dimension {dim} ({p.placements} on a "
                f"{p.device_mesh.ndim}-D mesh): a parameter with pending partial sums cannot take an optimizer "
                "step; redistribute it to Shard or Replicate placements before building the optimizer"
            )
    return tuple(groups)


def _distinct(groups) -> list[Any]:
    """Each process group once (by identity), in first-seen order: every rank sees its rows in the same order,
    so every rank issues its all-reduces group by group in the same order."""
    out: list[Any] = []
    for g in groups:
        if not any(g is seen for seen in out):
            out.append(g)
    return out
