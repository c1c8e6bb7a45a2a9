"""Session-wide test settings, applied before any test module is imported."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch.compile imports it (inductor) in whatever
# test runs first: set it for the whole session so the kernel tests run on CPU tensors whatever the order.
os.environ.setdefault("TRITON_INTERPRET", "1")
