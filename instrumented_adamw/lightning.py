"""Lightning: the force budgets of instrumented optimizers in Lightning's loggers, the books in its checkpoints.

    class LitModel(L.LightningModule):
        def configure_optimizers(self):
            return InstrumentedAdamW(self.named_parameters(), lr=1e-3, weight_decay=0.1)

    trainer = L.Trainer(callbacks=[ForceMonitorCallback(log_every=10, weibull_every=250)], ...)

Every ``log_every`` optimizer steps the callback reads the forces (a collective under FSDP2 / DTensor meshes: every
rank reads) and rank 0 sends the class budgets, shares, RMS, T/τ and the per-layer shares to every logger of the
Trainer (``forces/<class>/<metric>``, ``forces/layer<L>/<share>``), and every ``weibull_every`` steps the per-class
Weibull medians. The full records (per-tensor entries, every fit) go to JSONL files beside the checkpoints
(``<checkpoint dirpath>/forces/``, else ``<default_root_dir>/forces/``), flushed to disk before each checkpoint is
written. The monitor's state (T/τ and the per-tensor accumulation) is saved in every Lightning checkpoint, and a run
resumed from one continues the books; its JSONL files drop the records written after that checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from instrumented_adamw.alerts import lr_at_from_scheduler
from instrumented_adamw.monitor import ForceMonitor, as_tracked
from instrumented_adamw.sinks import JsonlSink, Sink
from instrumented_adamw.utils.extras import require

_callbacks = require("lightning.pytorch.callbacks", "the Lightning callback (instrumented_adamw.lightning)")


class ForceMonitorCallback(_callbacks.Callback):
    """Reads and logs the forces of the Trainer's instrumented optimizers (see the module docstring).

    Args:
        log_every: optimizer steps between reads (default: the Trainer's ``log_every_n_steps``).
        weibull_every: per-block Weibull fits every N steps (0: never); each gathers sharded matrices.
        per_tensor_every: per-tensor entries in the JSONL records every N steps (0: every read).
        sinks: where the full records go on rank 0 (default: JSONL files beside the checkpoints).
    """

    def __init__(self, log_every: int | None = None, weibull_every: int = 250, per_tensor_every: int = 250,
                 sinks: list[Sink] | None = None) -> None:  # fmt: skip
        self._log_every, self._weibull_every, self._per_tensor_every = log_every, weibull_every, per_tensor_every
        self._sinks = sinks
        self.monitor: ForceMonitor | None = None
        self._saved: dict[str, Any] | None = None  # the state a resumed run restores, until the monitor exists
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "instrumented_adamw.ForceMonitorCallback"

    def directory(self, trainer) -> Path:
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(checkpoints or trainer.default_root_dir) / "forces"

    def on_train_start(self, trainer, pl_module) -> None:
        opt = as_tracked(list(trainer.optimizers))
        if opt is None:
            raise TypeError(
                "ForceMonitorCallback needs an instrumented optimizer: return InstrumentedAdamW(self.named_parameters()"
                ", ...) (or InstrumentedMuon, or both) from configure_optimizers, got "
                f"{[type(o).__name__ for o in trainer.optimizers]}"
            )
        step = trainer.global_step
        sinks: list[Sink] = []
        if trainer.is_global_zero:
            sinks = self._sinks if self._sinks is not None else [JsonlSink(self.directory(trainer), resume_step=step)]
        log_every = self._log_every or max(1, int(trainer.log_every_n_steps))
        total = trainer.estimated_stepping_batches  # the diagnostics project T/τ to it (inf: an open-ended run)
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        step_wise = configs and getattr(configs[0], "interval", "step") == "step"  # an epoch schedule is not per step
        lr_at = lr_at_from_scheduler(configs[0].scheduler) if step_wise else None
        self.monitor = ForceMonitor(opt, pl_module, sinks, log_every=log_every, weibull_every=self._weibull_every,
                                    per_tensor_every=self._per_tensor_every,
                                    total_steps=int(total) if math.isfinite(total) else None, lr_at=lr_at)  # fmt: skip
        if step > 0 and self._saved:
            self.monitor.load_state_dict(self._saved)
        self._last_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.monitor is None or step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        if step % self.monitor.log_every == 0:
            reading = self.monitor.read(step)  # every rank: under FSDP2 the read is a collective
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            scalars = {"loss": float(loss)} if loss is not None else {}  # note: a sync point, on log steps only
            self.monitor.write(reading, **scalars)  # no sinks on other ranks: writes nothing there
            metrics.update(reading.logger_metrics())
        if self.monitor.weibull_every and step % self.monitor.weibull_every == 0:
            summary = self.monitor.fit(step)["summary"]  # gathers sharded matrices: every rank
            metrics.update({f"forces/{k}": v for k, v in summary.items()})
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict() if self.monitor is not None else dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = dict(state_dict)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.sync()  # the records up to this checkpoint are on disk before it is

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self._saved = self.monitor.state_dict()  # for a checkpoint written after training ends
            self.monitor.close()
            self.monitor = None
