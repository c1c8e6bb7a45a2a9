"""Optimizers: ``InstrumentedAdamW`` (``adamw``), ``InstrumentedMuon`` (``muon``), ``HybridOptimizer``
(``hybrid``), the read-out they share (``tracking``), the device force tables (``forces``), the update paths
(``functional``) and learning-rate schedules (``schedules``)."""

from instrumented_adamw.optim.adamw import InstrumentedAdamW
from instrumented_adamw.optim.forces import FORCES, LAST_KEYS, QUANTITIES, ForceReadout
from instrumented_adamw.optim.hybrid import HybridOptimizer
from instrumented_adamw.optim.muon import InstrumentedMuon, hybrid_param_groups
from instrumented_adamw.optim.tracking import ForceTracking, unwrap_optimizer

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
