"""Hugging Face ``Trainer`` integration: a callback that attaches a :class:`ForceMonitor`.

    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[ForceMonitorCallback(weibull_every=250)])

or let the Trainer build the optimizer (``optimizer_cls_and_kwargs=(InstrumentedAdamW, {...})``): its tensors are
then named from the model. On every log step the force metrics (``Transmission/align_share``, ...) join the
Trainer's own log row: ``trainer.state.log_history`` and every ``report_to`` integration (wandb, TensorBoard, ...)
see them next to ``loss`` and ``learning_rate``. Records also go to ``<output_dir>/forces/{metrics,forces,
weibull}.jsonl`` (or to ``sinks``), with the Trainer's loss and learning rate in ``metrics.jsonl``, so
``instrumented-adamw report <output_dir>/forces`` draws the run. The monitor's cumulative state (T/τ) is saved
in each checkpoint's ``trainer_state.json`` and restored by ``resume_from_checkpoint``. Under FSDP every rank
reads (the read is a collective); only the main process writes.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from instrumented_adamw.alerts import lr_at_from_scheduler
from instrumented_adamw.monitor import ForceMonitor, Reading, as_tracked
from instrumented_adamw.sinks import JsonlSink, Sink
from instrumented_adamw.utils.extras import require

_callbacks = require("transformers.trainer_callback", "the Hugging Face Trainer callback")
TrainerCallback, CallbackHandler = _callbacks.TrainerCallback, _callbacks.CallbackHandler
DefaultFlowCallback = _callbacks.DefaultFlowCallback

#: Key of the monitor's state in ``TrainerState.stateful_callbacks`` (saved in ``trainer_state.json``). Not a
#: class name on purpose: the Trainer re-creates callbacks whose class name matches a key from their saved
#: constructor arguments (``restore_callback_states_from_checkpoint``), which would lose user-given sinks.
STATE_KEY = "instrumented_adamw.ForceMonitor"


def _warn_if_the_trainer_dropped_weight_decay(opt, args) -> None:
    """The Trainer builds ``optimizer_cls_and_kwargs`` optimizers with its own parameter groups, whose weight decay is
    ``TrainingArguments.weight_decay`` (0 by default), not the kwargs': every decay force then reads zero."""
    optimizers = opt.optimizers if hasattr(opt, "optimizers") else [opt]
    for o in optimizers:
        asked = float(o.defaults.get("weight_decay", 0.0) or 0.0)
        if asked > 0 and all(float(g.get("weight_decay", 0.0)) == 0.0 for g in o.param_groups):
            warnings.warn(
                f"{type(o).__name__} was created with weight_decay={asked:g}, but every parameter group has weight "
                f"decay 0: the Trainer sets each group's weight decay from TrainingArguments.weight_decay "
                f"({args.weight_decay:g} here), overriding optimizer_cls_and_kwargs, so every decay force and share "
                f"reads 0. Pass TrainingArguments(weight_decay={asked:g}) to train with it.",
                stacklevel=3,
            )
            return


def _main_process(args, state) -> bool:
    """Rank 0 of the process group when there is one. Not ``state.is_world_process_zero`` alone: transformers 5.x
    builds the TrainerState that ``on_train_begin`` gets with that flag at its default (True) on every rank; and
    under DeepSpeed on CPU ``args.process_index`` is 0 on every rank too."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return state.is_world_process_zero and args.process_index == 0


def _deepspeed_route(args, optimizer) -> str:
    """Why, under DeepSpeed, the Trainer's optimizer is not ours, and the route that works."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    config = getattr(args, "hf_deepspeed_config", None)
    config = getattr(config, "config", None) or {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if "optimizer" in config:
        why = (
            'the DeepSpeed config has an "optimizer" section, so DeepSpeed built its own optimizer: remove that '
            "section and pass"
        )
    elif offload.get("device", "none") != "none" and config.get("zero_force_ds_cpu_optimizer", True):
        why = (
            "with ZeRO-Offload accelerate replaces the Trainer's optimizer by DeepSpeed's CPU Adam "
            '("zero_force_ds_cpu_optimizer", true by default): set "zero_force_ds_cpu_optimizer": false in the '
            "DeepSpeed config to keep InstrumentedAdamW (it then steps the offloaded partitions on the CPU), or "
            "train without offload, and pass"
        )
    else:
        why = "under DeepSpeed the Trainer discards optimizers=(...) and builds its optimizer itself: pass"
    return (
        f"ForceMonitorCallback needs the Trainer to use an instrumented optimizer, got {type(inner).__name__}: {why} "
        "optimizer_cls_and_kwargs=(InstrumentedAdamW, {'lr': ..., 'weight_decay': ...}) to the Trainer, with "
        "TrainingArguments(weight_decay=...) for the decay (ZeRO stages 0, 1 and 2 are measured exactly)"
    )


class ForceMonitorCallback(TrainerCallback):
    """Reads and logs the forces every ``log_every`` optimizer steps (default: the Trainer's ``logging_steps``).

    Args:
        sinks: where records go (default: JSONL files in ``<output_dir>/forces``), on the main process.
        log_every: optimizer steps between reads (default: ``args.logging_steps``, so the force metrics land in
            the Trainer's log rows).
        weibull_every: per-block Weibull fits every N steps (0 = never).
        per_tensor: per-tensor entries in the ``forces`` records.
        optimizers: the optimizers to read, when the Trainer's optimizer is not one of ours or not all of them
            (e.g. ``[muon, adamw]`` stepped by a wrapper of your own); default: the Trainer's.
    """

    def __init__(
        self,
        sinks: list[Sink] | None = None,
        log_every: int | None = None,
        weibull_every: int = 0,
        per_tensor: bool = True,
        optimizers: list | None = None,
    ) -> None:
        self._sinks, self._log_every, self._optimizers = sinks, log_every, optimizers
        self._weibull_every, self._per_tensor = weibull_every, per_tensor
        self.monitor: ForceMonitor | None = None
        self._pending: Reading | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = as_tracked(self._optimizers if self._optimizers is not None else optimizer)
        if opt is None and getattr(args, "deepspeed", None):
            raise TypeError(_deepspeed_route(args, optimizer))
        if opt is None:
            raise TypeError(
                f"ForceMonitorCallback needs the Trainer to use an instrumented optimizer, got "
                f"{type(optimizer).__name__}: pass optimizers=(InstrumentedAdamW(model.named_parameters(), ...), "
                "scheduler) or optimizer_cls_and_kwargs=(InstrumentedAdamW, {...}) to the Trainer (a Muon + AdamW "
                "run: a HybridOptimizer, or ForceMonitorCallback(optimizers=[muon, adamw]))"
            )
        sinks: list[Sink] = []
        if _main_process(args, state):
            sinks = self._sinks
            if sinks is None:
                sinks = [JsonlSink(Path(args.output_dir) / "forces", resume_step=state.global_step)]
        log_every = self._log_every or max(1, int(args.logging_steps))
        self.monitor = ForceMonitor(
            opt, model, sinks, log_every=log_every, weibull_every=self._weibull_every, per_tensor=self._per_tensor,
            total_steps=state.max_steps or None, lr_at=lr_at_from_scheduler(kwargs.get("lr_scheduler")),
        )  # fmt: skip
        _warn_if_the_trainer_dropped_weight_decay(opt, args)
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if state.global_step > 0 and saved:  # resumed from a checkpoint: T/τ continues where it was
            self.monitor.load_state_dict(saved)
        self._run_before_integrations()

    def _run_before_integrations(self) -> None:
        """Move this callback right after the Trainer's flow callback.

        The Trainer calls callbacks in order, and the ``report_to`` integrations come before any user callback:
        to let them log the force metrics, ours must add them to the log row first. No event hands a callback
        the handler, so it is taken from the calling frame (``CallbackHandler.call_event``); moving an element
        that is being iterated to an earlier position skips and repeats nothing.
        """
        handler = sys._getframe(2).f_locals.get("self")
        if not isinstance(handler, CallbackHandler) or self not in handler.callbacks:
            warnings.warn(
                "ForceMonitorCallback could not place itself before the Trainer's report_to integrations; force "
                "metrics reach trainer.state.log_history and the JSONL files, but may miss wandb/TensorBoard rows",
                stacklevel=3,
            )
            return
        callbacks = handler.callbacks
        flow = max((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), default=-1)
        if callbacks.index(self) > flow + 1:
            callbacks.remove(self)
            callbacks.insert(flow + 1, self)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        step = state.global_step
        if step % self.monitor.log_every == 0:
            reading = self.monitor.read(step)  # every rank: under FSDP the read is a collective
            if control.should_log:
                self._pending = reading  # the Trainer logs this step: write with its loss and lr in on_log
            else:
                self.monitor.write(reading)  # no sinks on other ranks: writes nothing there
            state.stateful_callbacks[STATE_KEY] = self.monitor.state_dict()
        if self.monitor.weibull_every and step % self.monitor.weibull_every == 0:
            self.monitor.fit(step)  # gathers FSDP shards: every rank
        if self._pending is None:  # a pending reading is written, then synced, in on_log
            self._sync_before_save(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        reading, self._pending = self._pending, None
        if self.monitor is None or reading is None:
            return
        if logs is None or reading.step != state.global_step:
            self.monitor.write(reading)
            self._sync_before_save(control)
            return
        scalars = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "learning_rate" in scalars:
            scalars.setdefault("lr", scalars["learning_rate"])  # the key our report reads
        metrics = self.monitor.write(reading, **scalars)
        forces = {k: v for k, v in metrics.items() if k in reading.metrics}
        logs.update(forces)  # integrations called after this callback log them with the row
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(forces)
        self._sync_before_save(control)

    def _sync_before_save(self, control) -> None:
        """The Trainer saves a checkpoint after this step's callbacks: the logs up to it go to disk first, so a
        run resumed from that checkpoint after a power loss finds every record up to its step."""
        if self.monitor is not None and control.should_save:
            self.monitor.sync()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._sync_before_save(control)  # save_strategy="epoch" decides here

    def on_save(self, args, state, control, **kwargs):
        # save_strategy="best" decides after evaluating, with no callback before the save: sync right after it.
        if self.monitor is not None:
            self.monitor.sync()

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            if self._pending is not None:
                self.monitor.write(self._pending)
                self._pending = None
            self.monitor.close()
            self.monitor = None
