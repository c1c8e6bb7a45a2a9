"""DeepSpeed ZeRO stages 1 and 2: the forces of the model's parameters, measured on the flat partitions.

ZeRO-1/2 hands the client optimizer one flat fp32 partition per param group and rank in place of the parameters.
DeepSpeed keeps the map back (``param._hp_mapping``, which its public ``safe_get_full_fp32_param`` uses): which slice
of this rank's partition holds which elements of which parameter. An elementwise update (AdamW) of the flat tensor is
the same, element for element, as the update of each slice on its own, so the step runs on views of the slices: the
values are the flat update's bitwise, and each view's reductions are that parameter's partial sums on this rank. The
read adds them over the data-parallel group (one all-reduce), as for FSDP2 shards. A parameter with no element on
this rank still takes a (zero) step record, so every rank counts the same steps.

Nothing here imports DeepSpeed: the map is read from the attributes DeepSpeed sets, and anything it cannot account
for, element by element, is refused (:func:`map_partition` raises), never reported as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from instrumented_adamw.kernels.reductions import sq_norms_exact

WORKS = (
    "What works: DeepSpeed ZeRO stages 0, 1 and 2 with InstrumentedAdamW, torch DDP, FSDP2 or any DTensor mesh "
    "(HF Trainer and accelerate included); or pass track=False to train without measuring."
)


@dataclass
class Partition:
    """One flat partition: segments covering it in order (a parameter's slice, or DeepSpeed's padding)."""

    flat: Tensor
    group: int  # the param group the optimizer was given, whose tensors these are
    starts: list[int]
    numels: list[int]
    keys: list[Tensor | None]  # the parameter each segment belongs to; None for padding (updated, not measured)
    views: list[Tensor]  # persistent views of ``flat``: the weights each row's closure norm is taken on
    # The moments' cuts, per slot (exp_avg, exp_avg_sq, max_exp_avg_sq), with the tensor they were cut from: the
    # moments persist, so their views are made once (and replaced, not kept beside, when a load replaces them).
    state_views: dict[int, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)

    def split(self, t: Tensor, slot: int = 0) -> list[Tensor]:
        """``t`` (shaped like ``flat``: its grad, a new tensor every step, or a moment) cut as the segments."""
        if slot:
            kept = self.state_views.get(slot)
            if kept is not None and kept[0] is t:
                return kept[1]
        views = [t.narrow(0, s, n) for s, n in zip(self.starts, self.numels, strict=True)]
        if slot:
            self.state_views[slot] = (t, views)
        return views


class ZeroMap:
    """The partitions mapped so far, and for each of their parameters the view its closure norm is taken on and the
    process group its partial sums add up over."""

    def __init__(self) -> None:
        self.partitions: dict[int, Partition] = {}  # id(flat) ->
        self.view: dict[int, Tensor] = {}  # id(parameter) -> its slice of this rank's partition (maybe empty)
        self.group: dict[int, tuple[Any, ...]] = {}  # id(parameter) -> the groups its slices' sums add up over

    def __bool__(self) -> bool:
        return bool(self.partitions)

    def knows(self, t: Tensor) -> bool:
        return id(t) in self.partitions

    def group_index(self, params: list[Tensor], default: int) -> int:
        """The index of the param group these tensors were given as: DeepSpeed's one-group calls show each group
        at position 0."""
        part = self.partitions.get(id(params[0])) if params else None
        return part.group if part is not None else default

    def counts(self, param_groups: list[dict]) -> bool:
        """Whether this ``step()`` call counts as a step: ZeRO-1/2 calls it once per group, each time with that group
        alone in ``param_groups``; the call of the first group counts, so ``track_every`` counts optimizer steps."""
        if not self.partitions or len(param_groups) != 1 or not param_groups[0]["params"]:
            return True
        part = self.partitions.get(id(param_groups[0]["params"][0]))
        return part is None or part.group == 0

    def owners(self, params, given: list[list[Tensor]]) -> list[Tensor]:
        """``params`` with each mapped flat partition replaced by the parameters of its group."""
        out = []
        for p in params:
            part = self.partitions.get(id(p))
            out.extend(given[part.group] if part is not None else [p])
        return out

    def cuts(self, params: list[Tensor]) -> tuple[list[Tensor], dict[int, list[tuple[int, int, int]]]]:
        """For an update of the flat partitions whole (see :meth:`InstrumentedAdamW._partition_path`): the tensors
        the rows are keyed by, and for each flat partition its parameters' slices ``(position in those, start,
        numel)``."""
        keys: list[Tensor] = []
        cut: dict[int, list[tuple[int, int, int]]] = {}
        for i, p in enumerate(params):
            part = self.partitions[id(p)]
            cut[i] = []
            for key, start, numel in zip(part.keys, part.starts, part.numels, strict=True):
                if key is not None:
                    cut[i].append((len(keys), start, numel))
                    keys.append(key)
        return keys, cut

    def expand(self, lists: list[list[Tensor]], state_steps: list[Tensor]):
        """The step's lists (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs) with each flat partition
        replaced by its segments; the tensors the rows are keyed by (None for padding); and a function to call
        after the update, which writes the segments' step counts back to the flat partition's."""
        params = lists[0]
        out: list[list[Tensor]] = [[] for _ in lists]
        keys: list[Tensor | None] = []
        steps: list[Tensor] = []
        back: list[tuple[Tensor, Tensor]] = []
        for i, p in enumerate(params):
            part = self.partitions.get(id(p))
            if part is None:
                for o, ts in zip(out, lists, strict=True):
                    if ts:
                        o.append(ts[i])
                keys.append(p)
                steps.append(state_steps[i])
                continue
            out[0].extend(part.views)
            for j in range(1, len(lists)):
                if lists[j]:
                    out[j].extend(part.split(lists[j][i], slot=j - 1))  # slot 0: the grad, not kept
            keys.extend(part.keys)
            # One count per segment (torch's paths add 1 to each tensor's); all start equal and end equal.
            copies = [state_steps[i].clone() for _ in part.views]
            steps.extend(copies)
            back.append((state_steps[i], copies[0]))

        def finish() -> None:
            for flat_step, copy in back:
                flat_step.copy_(copy)

        return out, keys, steps, finish


def _padding_only(flat: Tensor, given: list[list[Tensor]], optimizer_name: str) -> Partition | None:
    """A partition holding no parameter's element on this rank (DeepSpeed pads a small group to a multiple of the
    ranks): still mapped, all padding, so that this rank counts the group's steps and joins the coverage check the
    other ranks make. Its group is the one DeepSpeed linked whose parameters all have no slice here; None if there
    is no such group, or several."""
    linked = [g for g, params in enumerate(given)
              if params and all(hasattr(p, "_dp_group") and getattr(p, "_hp_mapping", 0) is None
                                for p in params if p.requires_grad)]  # fmt: skip
    if len(linked) != 1:
        return None
    (g,) = linked
    trainable = [p for p in given[g] if p.requires_grad]
    _check_coverage(trainable, {}, trainable[0], optimizer_name)
    starts, numels = [0] + [0] * len(trainable), [flat.numel()] + [0] * len(trainable)
    keys: list[Tensor | None] = [None, *trainable]
    views = [flat.narrow(0, s, n) for s, n in zip(starts, numels, strict=True)]
    return Partition(flat=flat, group=g, starts=starts, numels=numels, keys=keys, views=views)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def refuse_unmappable(given: list[list[Tensor]], optimizer_name: str, elementwise: bool) -> None:
    """Raise the specific reason when the parameters' replacements are DeepSpeed's and cannot be mapped."""
    flat = [p for group in given for p in group]
    if any(hasattr(p, "ds_id") for p in flat):
        raise RuntimeError(
            f"{optimizer_name}: DeepSpeed ZeRO stage 3 partitions every parameter across ranks and hands the optimizer "
            "flat fp32 partitions without a per-parameter map this package reads, so no force can be attributed to "
            "your parameters and nothing is reported rather than zeros. Use ZeRO stage 1 or 2 (exact per-parameter "
            f"forces) or FSDP2 (the same memory savings as stage 3, exact forces). {WORKS}"
        )
    if not elementwise and any(hasattr(p, "_hp_mapping") for p in flat):
        raise RuntimeError(
            f"{optimizer_name}: DeepSpeed ZeRO stages 1 and 2 hand the optimizer flat 1-D partitions, which cut "
            "matrices into pieces; an update that needs each whole matrix (Muon's orthogonalisation) cannot run on "
            "them. Use ZeRO stage 0, DDP or FSDP2 for Muon, or InstrumentedAdamW with ZeRO stages 1 and 2."
        )


def map_partition(flat: Tensor, given: list[list[Tensor]], optimizer_name: str) -> Partition | None:
    """The segments of ``flat`` from DeepSpeed's fragment map, checked to cover every element of every trainable
    parameter of its group once across the data-parallel group (one all-reduce); None if no parameter maps to it.
    Every rank of the group calls this for the same partition at the same time (inside the same ``step()``)."""
    owners: list[tuple[int, int, Tensor, int]] = []  # (start, numel, parameter, group)
    for g, params in enumerate(given):
        for p in params:
            frag = getattr(p, "_hp_mapping", None)
            if frag is None or not _same_storage(frag.hp_fragment, flat):
                continue
            start = frag.hp_fragment.storage_offset() - flat.storage_offset()
            numel = frag.hp_fragment.numel()
            if start != frag.hp_fragment_address.start or numel != frag.hp_fragment_address.numel:
                raise RuntimeError(
                    f"{optimizer_name}: DeepSpeed's fragment map of a parameter of shape {tuple(p.shape)} says "
                    f"offset {frag.hp_fragment_address.start} (+{frag.hp_fragment_address.numel}), its view is at "
                    f"{start} (+{numel}) of the flat partition: this DeepSpeed version lays partitions out in a way "
                    f"this package does not read. {WORKS}"
                )
            owners.append((start, numel, p, g))
    if not owners:
        return _padding_only(flat, given, optimizer_name)
    groups = {g for *_, g in owners}
    if len(groups) != 1 or flat.dim() != 1:
        raise RuntimeError(
            f"{optimizer_name}: a DeepSpeed flat partition holds parameters of param groups {sorted(groups)} "
            f"(shape {tuple(flat.shape)}); this package maps one group per 1-D partition. {WORKS}"
        )
    (g,) = groups
    owners.sort(key=lambda o: o[0])
    starts, numels, keys = [], [], []
    at = 0
    for start, numel, p, _ in owners:
        if start < at:
            raise RuntimeError(
                f"{optimizer_name}: two parameters' fragments overlap in a DeepSpeed flat partition (at {start}). "
                f"{WORKS}"
            )
        if start > at:  # padding
            starts.append(at), numels.append(start - at), keys.append(None)
        starts.append(start), numels.append(numel), keys.append(p)
        at = start + numel
    if at < flat.numel():
        starts.append(at), numels.append(flat.numel() - at), keys.append(None)
    if at > flat.numel():
        raise RuntimeError(f"{optimizer_name}: a fragment runs past the end of its DeepSpeed partition. {WORKS}")
    here = {id(p) for _, _, p, _ in owners}
    trainable = [p for p in given[g] if p.requires_grad]
    for p in trainable:  # no element on this rank: an empty segment, so its row still counts the step
        if id(p) not in here:
            starts.append(0), numels.append(0), keys.append(p)
    sizes = {id(k): n for k, n in zip(keys, numels, strict=True) if k is not None}
    _check_coverage(trainable, sizes, owners[0][2], optimizer_name)
    views = [flat.narrow(0, s, n) for s, n in zip(starts, numels, strict=True)]
    return Partition(flat=flat, group=g, starts=starts, numels=numels, keys=keys, views=views)


def _check_coverage(trainable: list[Tensor], here: dict[int, int], any_owner: Tensor, optimizer_name: str) -> None:
    """Every element of every trainable parameter in exactly one rank's partition: the fragments' sizes summed over
    the data-parallel group equal the parameters' sizes."""
    import torch.distributed as dist

    group = getattr(any_owner, "_dp_group", None)
    counts = torch.tensor([here.get(id(p), 0) for p in trainable], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        moved = counts.to(device)
        dist.all_reduce(moved, group=group)
        counts = moved.cpu()
    expected = torch.tensor([p.numel() for p in trainable], dtype=torch.int64)
    if not torch.equal(counts, expected):
        bad = [i for i in range(len(trainable)) if counts[i] != expected[i]]
        i = bad[0]
        raise RuntimeError(
            f"{optimizer_name}: DeepSpeed's fragment map covers {int(counts[i])} of the {int(expected[i])} elements "
            f"of a parameter of shape {tuple(trainable[i].shape)} across the data-parallel group ({len(bad)} "
            f"parameter(s) like it): the forces could not be attributed exactly. {WORKS}"
        )


def sq_norms_on(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``sq_norms_exact`` of tensors that may live on several devices (ZeRO-Offload: a CUDA row measured on its
    slice of a CPU partition), as one float64 tensor on ``device``."""
    if all(t.device == device for t in tensors):
        return sq_norms_exact(tensors)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        out[idx] = sq_norms_exact([tensors[i] for i in idx]).to(device)
    return out


def dp_groups(p: Tensor) -> tuple[Any, ...]:
    """The group a DeepSpeed parameter's slices add up over (its ``_dp_group``; None is the default group); none in
    a single process."""
    import torch.distributed as dist

    return (getattr(p, "_dp_group", None),) if dist.is_available() and dist.is_initialized() else ()
