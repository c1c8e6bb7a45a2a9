"""Reproduction trainer: config tree → transformers model → data → loop with InstrumentedAdamW → run directory.

Run ``python -m train configs/demo.yaml [section.field=value ...]``. The library (``instrumented_adamw``) never
imports this package.
"""
