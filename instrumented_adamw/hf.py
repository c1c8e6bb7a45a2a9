"""Hugging Face ``Trainer`` integration: a callback that attaches a :class:`ForceMonitor`.

    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[ForceMonitorCallback(weibull_every=250)])

Records go to ``<output_dir>/forces/{metrics,forces,weibull}.jsonl`` unless ``sinks`` are given. The Trainer's
own logging (loss, learning rate, wandb via ``report_to``) is untouched.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .monitor import ForceMonitor
from .optim import InstrumentedAdamW
from .sinks import JsonlSink, Sink


def _unwrap(optimizer):
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); the Trainer passes the wrapper.
    while optimizer is not None and not isinstance(optimizer, InstrumentedAdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class ForceMonitorCallback(TrainerCallback):
    """Reads and logs the forces every ``log_every`` optimizer steps (default: the Trainer's ``logging_steps``)."""

    def __init__(self, sinks: list[Sink] | None = None, log_every: int | None = None, weibull_every: int = 0) -> None:
        self._sinks, self._log_every, self._weibull_every = sinks, log_every, weibull_every
        self.monitor: ForceMonitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if not isinstance(opt, InstrumentedAdamW):
            raise TypeError(
                f"ForceMonitorCallback needs the Trainer to use InstrumentedAdamW, got {type(opt).__name__}: pass "
                "optimizers=(InstrumentedAdamW(model.named_parameters(), ...), scheduler) to the Trainer"
            )
        sinks = self._sinks
        if sinks is None:
            sinks = [JsonlSink(Path(args.output_dir) / "forces", resume_step=state.global_step)]
        log_every = self._log_every or max(1, int(args.logging_steps))
        self.monitor = ForceMonitor(opt, model, sinks, log_every=log_every, weibull_every=self._weibull_every)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None and state.is_world_process_zero:
            self.monitor.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
