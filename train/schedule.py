"""Learning-rate schedule of a run: the library's pure function, fed from the config."""

from __future__ import annotations

from instrumented_adamw.schedules import warmup_cosine

from .config import ScheduleConfig


def lr_at(step: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) under ``cfg``: warmup, then cosine to min_lr_ratio·peak."""
    return warmup_cosine(step, peak, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio, cfg.kind)
