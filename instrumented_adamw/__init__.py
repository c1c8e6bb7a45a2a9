"""instrumented-adamw: see why weight norms grow under AdamW, live, at no measurable cost to training.

Layers (docs/architecture.md), each importing only those before it: ``utils`` and ``taxonomy`` → ``kernels`` →
``optim`` → ``weibull`` → ``sinks`` / ``monitor`` → integrations (``hf``, ``lightning``, ``torchtitan``) →
``analysis`` → ``cli``.
"""

from instrumented_adamw import optim as _optim
from instrumented_adamw.optim import (  # noqa: F401 - the public API, listed in optim.__all__
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

__all__ = list(_optim.__all__)
__version__ = "0.1.0"
