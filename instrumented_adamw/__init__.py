"""instrumented-adamw: see why weight norms grow under AdamW, live, at no measurable cost to training."""

from .forces import FORCES, LAST_KEYS, QUANTITIES, ForceReadout
from .hybrid import HybridOptimizer
from .muon import InstrumentedMuon, hybrid_param_groups
from .optim import InstrumentedAdamW
from .tracking import ForceTracking, unwrap_optimizer

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
