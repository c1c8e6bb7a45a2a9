"""instrumented-adamw: see why weight norms grow under AdamW, live, at no measurable cost to training."""

from .forces import FORCES, LAST_KEYS, QUANTITIES, ForceReadout
from .optim import InstrumentedAdamW

__all__ = ["FORCES", "LAST_KEYS", "QUANTITIES", "ForceReadout", "InstrumentedAdamW"]
__version__ = "0.1.0"
