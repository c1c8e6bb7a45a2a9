"""This repository's experiment machinery, run from a checkout (never installed, never imported by the library).

- ``python -m experiments.gpu_evidence``: GPU evidence windows (kernel checks, benchmarks, campaign runs).
- ``python -m experiments.cpu_study``: the CPU study; ``python -m experiments.golden``: its golden regression run.
- ``python -m experiments.results_doc``: docs/results.md and the GPU benchmark table from ``results/``.
"""
