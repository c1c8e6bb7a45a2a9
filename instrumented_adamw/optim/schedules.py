"""Learning-rate schedules as pure functions of the step, shared by the trainer and the analyses.

The analyses need η_t at every step (spline recovery, published Pythia checkpoints) without importing the trainer.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, warmup: int, total: int, min_ratio: float, kind: str = "cosine") -> float:
    """η of optimizer step ``step`` (0-based: the step that moves W_step to W_step+1).

    Linear warmup from peak/warmup to peak over ``warmup`` steps, then cosine from peak to ``min_ratio``·peak at
    ``total`` (``kind="constant"``: the peak), constant at the floor afterwards.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


#: The published Pythia-70M schedule (EleutherAI): lr 1e-3, warmup 1430, cosine to 0.1× over 143,000 steps,
#: weight decay 0.01, betas (0.9, 0.95).
PYTHIA_SCHEDULE = dict(peak=1e-3, warmup=1430, total=143_000, min_ratio=0.1)
PYTHIA_WEIGHT_DECAY = 0.01


def pythia_lr(step: int) -> float:
    return warmup_cosine(step, **PYTHIA_SCHEDULE)
