"""instrumented-adamw: see why weight norms grow under AdamW, live, at no measurable cost to training."""

from .forces import FORCES, LAST_KEYS, QUANTITIES, ForceReadout
from .optim import InstrumentedAdamW, unwrap_optimizer

__all__ = ["FORCES", "LAST_KEYS", "QUANTITIES", "ForceReadout", "InstrumentedAdamW", "unwrap_optimizer"]
__version__ = "0.1.0"
