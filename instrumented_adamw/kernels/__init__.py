"""Kernels: the single-pass CPU AdamW (``cpu_adamw`` + ``cpu_adamw.c``), the single-pass Triton AdamW
(``triton_adamw``), exact reductions (``reductions``) and the force table's column layout the kernels write
(``force_table``). Imports only ``instrumented_adamw.utils``."""
