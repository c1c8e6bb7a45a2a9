"""Several instrumented optimizers stepped as one: the usual Muon (hidden matrices) + AdamW (the rest) split.

``HybridOptimizer`` is what a training loop holds when different tensors go to different optimizers: ``step``,
``zero_grad``, ``param_groups`` (all groups, for a loop that sets ``group["lr"]``), ``state_dict`` /
``load_state_dict`` (one entry per optimizer), and the read-out of :class:`~instrumented_adamw.optim.tracking.
ForceTracking` over all of them, with :meth:`optimizer_of` naming which optimizer moved each tensor.
:class:`~instrumented_adamw.monitor.ForceMonitor` and the HF callback take it (or a plain list of optimizers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from instrumented_adamw.optim.forces import ForceReadout
from instrumented_adamw.optim.tracking import ForceTracking, unwrap_optimizer


class HybridOptimizer:
    """Steps every optimizer in ``optimizers`` (each tracks its own tensors; none may share one)."""

    def __init__(self, optimizers: Sequence[Any]) -> None:
        self.optimizers = [unwrap_optimizer(o) for o in optimizers]
        if not self.optimizers:
            raise ValueError("HybridOptimizer needs at least one optimizer")
        seen: dict[int, str] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(f"a parameter is in both {seen[id(p)]} and {type(opt).__name__}")
                    seen[id(p)] = type(opt).__name__

    # ------------------------------------------------------------------ the optimizer protocol
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for opt in self.optimizers for k, v in opt.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One optimizer-shaped state dict (``state``, ``param_groups``) of all optimizers: parameter indices run on
        across them, and each group records its optimizer (``hybrid_optimizer``). Anything that checkpoints an
        optimizer (torch.save, a trainer's resume state, its finiteness checks) handles it unchanged."""
        state, groups, offset = {}, [], 0
        for k, opt in enumerate(self.optimizers):
            sd = opt.state_dict()
            state.update({index + offset: st for index, st in sd["state"].items()})
            for group in sd["param_groups"]:
                groups.append(dict(group, params=[i + offset for i in group["params"]], hybrid_optimizer=k))
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups", [])
        owners = [g.get("hybrid_optimizer") for g in groups]
        mine = [len(opt.param_groups) for opt in self.optimizers]
        found = [owners.count(k) for k in range(len(self.optimizers))]
        if None in owners or found != mine:
            raise ValueError(
                f"not a state dict of this HybridOptimizer: it has groups per optimizer {found}, this one {mine} "
                "(state dicts of a HybridOptimizer mark each group's optimizer in 'hybrid_optimizer')"
            )
        for k, opt in enumerate(self.optimizers):
            own = [g for g in groups if g["hybrid_optimizer"] == k]
            indices = [i for g in own for i in g["params"]]
            renumber = {old: new for new, old in enumerate(indices)}
            opt.load_state_dict(
                {
                    "state": {renumber[i]: st for i, st in state_dict["state"].items() if i in renumber},
                    "param_groups": [
                        {key: v for key, v in dict(g, params=[renumber[i] for i in g["params"]]).items()
                         if key != "hybrid_optimizer"}
                        for g in own
                    ],
                }
            )  # fmt: skip

    # ------------------------------------------------------------------ the read-out, over all optimizers
    def _tracking(self) -> list[ForceTracking]:
        return [o for o in self.optimizers if isinstance(o, ForceTracking)]

    def read_forces(self, reset: bool = True) -> ForceReadout:
        return ForceReadout.concat([o.read_forces(reset=reset) for o in self._tracking()])

    def last_forces(self) -> ForceReadout:
        return self.read_forces(reset=False)

    def tracked_parameters(self) -> list[tuple[str, Tensor]]:
        return [item for o in self._tracking() for item in o.tracked_parameters()]

    @property
    def tracked_names(self) -> list[str]:
        return [n for n, _ in self.tracked_parameters()]

    @property
    def has_unnamed_parameters(self) -> bool:
        return any(o.has_unnamed_parameters for o in self._tracking())

    def name_parameters(self, named: nn.Module | Sequence[tuple[str, Tensor]], only_unnamed: bool = True) -> int:
        items = list(named.named_parameters()) if isinstance(named, nn.Module) else list(named)
        return sum(o.name_parameters(items, only_unnamed) for o in self._tracking())

    def optimizer_of(self) -> dict[str, str]:
        """Which optimizer moves each tracked tensor: ``{name: class name}``."""
        return {n: type(o).__name__ for o in self._tracking() for n in o.tracked_names}
