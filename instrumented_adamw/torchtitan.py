"""torchtitan: the instrumented optimizers in its optimizer container, and their force budgets in its metrics.

torchtitan builds optimizers from names (``OptimizersContainer``, a name → class factory that knows Adam, AdamW and
its DistMuon) and logs through ``MetricsProcessor.log(..., extra_metrics=...)`` to TensorBoard / wandb. Both are
``Configurable`` components a job config (or a TrainSpec) names, so the integration is two subclasses::

    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from instrumented_adamw.torchtitan import ForceMetricsProcessor, InstrumentedOptimizersContainer

    optimizer = InstrumentedOptimizersContainer.Config(param_groups=[ParamGroupConfig(
        pattern=".*", optimizer_name="InstrumentedAdamW", optimizer_kwargs=dict(lr=8e-4, weight_decay=0.1))])
    metrics = ForceMetricsProcessor.Config(log_freq=10, enable_tensorboard=True, weibull_every=250)

``InstrumentedAdamW`` and ``InstrumentedMuon`` are then names the factory knows, every parameter keeps torchtitan's
canonical name (its groups carry ``param_names``), and the forces work on every mesh torchtitan builds (FSDP2, TP,
HSDP: DTensors, combined on read). Checkpoints go through torchtitan's flat DCP state dicts unchanged; the
``track_calls`` counter rides in every param group, so it round-trips. torchtitan materialises optimizer state
with a zero-gradient, zero-lr step before its first save or load; the container takes that step untracked, so it
enters neither the force books nor the step counter.

On log steps :class:`ForceMetricsProcessor` reads the forces (a collective under sharding: torchtitan calls ``log``
on every rank) and adds the class and layer budgets, shares and, every ``weibull_every`` steps, the per-class
Weibull medians to ``extra_metrics``; with ``forces_jsonl`` rank 0 also writes the full records (per-tensor entries
and fits) as JSONL beside the TensorBoard folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.optim import InstrumentedAdamW, InstrumentedMuon
from instrumented_adamw.optim.tracking import ForceTracking
from instrumented_adamw.sinks import JsonlSink
from instrumented_adamw.utils.extras import require

require("torchtitan", "instrumented_adamw.torchtitan (the torchtitan integration)")

from torchtitan.components.metrics import MetricsProcessor  # noqa: E402 - after the check above
from torchtitan.components.optimizer import OptimizersContainer  # noqa: E402

#: Optimizer names the container adds to torchtitan's factory.
FACTORIES = {"InstrumentedAdamW": InstrumentedAdamW, "InstrumentedMuon": InstrumentedMuon}
#: Param group keys the instrumented optimizers add (absent from checkpoints of torch's optimizers).
_INSTRUMENTED_GROUP_KEYS = ("track_calls", "lr_peak")


class InstrumentedOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` whose factory also knows ``InstrumentedAdamW`` and ``InstrumentedMuon``."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name in FACTORIES:
            return FACTORIES[name]
        return OptimizersContainer._resolve_optimizer_factory(name)

    @property
    def instrumented(self) -> list[ForceTracking]:
        return [o for o in self.optimizers if isinstance(o, ForceTracking)]

    def state_dict(self) -> dict[str, Any]:
        self._materialise_state_untracked()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torchtitan's load; a checkpoint written by torch's own optimizers (no ``track_calls``, no ``lr_peak``)
        loads too, the missing keys taken from the live groups."""
        state_dict = dict(state_dict)
        for optim in self.instrumented:
            for group in optim.param_groups:
                for key in _INSTRUMENTED_GROUP_KEYS:
                    for fqn in group.get("param_names", ()):
                        state_dict.setdefault(f"param_groups.{fqn}.{key}", group.get(key))
        self._materialise_state_untracked()  # before the load: the loaded counter is then the one kept
        super().load_state_dict(state_dict)

    def _materialise_state_untracked(self) -> None:
        """torchtitan's state materialisation (one zero-gradient, zero-lr step) taken without tracking it or
        counting it, so it enters neither the force books nor the ``track_every`` phase."""
        from torchtitan.components.optimizer.utils import init_optim_state

        for optim in self.instrumented:
            if optim.state:
                continue
            track, calls = optim._track, int(optim._calls)
            optim._track = False
            try:
                init_optim_state(optim)
            finally:
                optim._track = track
                optim._calls.fill_(calls)


class ForceMetricsProcessor(MetricsProcessor):
    """torchtitan's ``MetricsProcessor`` that adds the force budgets to every log (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        weibull_every: int = 250
        """Per-block Weibull fits every N steps (0: never); each gathers its matrix across ranks."""

        per_tensor_every: int = 250
        """Per-tensor entries in the JSONL records on steps that are multiples of N (0: every log)."""

        forces_jsonl: bool = True
        """Rank 0 also writes forces.jsonl / weibull.jsonl / metrics.jsonl beside the TensorBoard folder."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._dump_folder = Path(kwargs.get("dump_folder", "./outputs"))
        self.monitor: ForceMonitor | None = None

    def _force_monitor(self) -> ForceMonitor:
        if self.monitor is None:
            if self.optimizers is None:
                raise RuntimeError("ForceMetricsProcessor.log before the trainer set .optimizers (torchtitan does)")
            optimizers = [o for o in self.optimizers if isinstance(o, ForceTracking)]
            if not optimizers:
                raise TypeError(
                    "ForceMetricsProcessor needs instrumented optimizers: build them with "
                    "InstrumentedOptimizersContainer and optimizer_name='InstrumentedAdamW' (or 'InstrumentedMuon')"
                )
            import torch.distributed as dist

            main = not dist.is_initialized() or dist.get_rank() == 0
            sinks = [JsonlSink(self._dump_folder / "forces")] if main and self.config.forces_jsonl else []
            model = self.model_parts[0] if self.model_parts and len(self.model_parts) == 1 else None
            self.monitor = ForceMonitor(optimizers, model, sinks, log_every=self.config.log_freq,
                                        weibull_every=self.config.weibull_every,
                                        per_tensor_every=self.config.per_tensor_every)  # fmt: skip
        return self.monitor

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None) -> None:  # fmt: skip
        monitor = self._force_monitor()
        reading = monitor.read(step)
        metrics = reading.logger_metrics()  # per class: shares, rms, net, T/τ, ...; per layer: shares and net
        monitor.write(reading, loss=global_avg_loss)
        if self.config.weibull_every and step % self.config.weibull_every == 0:
            metrics.update({f"forces/{k}": v for k, v in monitor.fit(step)["summary"].items()})
        super().log(
            step, global_avg_loss, global_max_loss, grad_norm, extra_metrics={**metrics, **(extra_metrics or {})}
        )

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        super().close()
