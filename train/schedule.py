"""Learning-rate schedules as pure functions of the step (testable without a model)."""

from __future__ import annotations

import math

from .config import ScheduleConfig


def lr_at(step: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based: the step that moves W_step to W_step+1).

    Linear warmup from peak/warmup to peak over ``warmup_steps``, then cosine from peak to ``min_lr_ratio``·peak at
    ``total_steps`` (or constant). The papers' recipe: warmup 200, cosine to 0.1× over 20,000 steps.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
