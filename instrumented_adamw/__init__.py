"""instrumented-adamw: see why weight norms grow under AdamW, live, at no measurable cost to training.

Layers (docs/architecture.md), each importing only those before it: ``utils`` and ``taxonomy`` → ``kernels`` →
``optim`` → ``weibull`` → ``sinks`` / ``monitor`` → integrations (``hf``) → ``analysis`` → ``cli``.
"""

from instrumented_adamw.optim import (
    FORCES,
    LAST_KEYS,
    QUANTITIES,
    ForceReadout,
    ForceTracking,
    HybridOptimizer,
    InstrumentedAdamW,
    InstrumentedMuon,
    hybrid_param_groups,
    unwrap_optimizer,
)

__all__ = [
    "FORCES",
    "LAST_KEYS",
    "QUANTITIES",
    "ForceReadout",
    "ForceTracking",
    "HybridOptimizer",
    "InstrumentedAdamW",
    "InstrumentedMuon",
    "hybrid_param_groups",
    "unwrap_optimizer",
]
__version__ = "0.1.0"
