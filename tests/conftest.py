"""Session-wide test settings, applied before any test module (or the libraries it uses) is imported.

Hermetic: every cache and config directory a library would read from this machine's home points into a fresh
temporary directory, so no test depends on a model someone downloaded, wandb credentials someone stored, or a
previous run's leftovers. Subprocesses the tests start inherit the same environment.
"""

from __future__ import annotations

import os
import tempfile

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and torch.compile imports it (inductor) in whatever
# test runs first: without a GPU, set it for the whole session so the kernel tests run on CPU tensors whatever the
# order. With a GPU it stays unset: tests/test_cuda.py must compile the kernel for the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HOME = tempfile.mkdtemp(prefix="instrumented-adamw-tests-")
for var, sub in (
    ("HF_HOME", "hf"),  # hub cache: no cached pythia-70m can make an offline test pass or fail
    ("HF_HUB_CACHE", "hf/hub"),
    ("HF_DATASETS_CACHE", "hf/datasets"),
    ("WANDB_DIR", "wandb"),
    ("WANDB_CONFIG_DIR", "wandb/config"),  # no stored wandb settings or login
    ("WANDB_CACHE_DIR", "wandb/cache"),
    ("WANDB_DATA_DIR", "wandb/data"),
    ("NETRC", "netrc-none"),  # no stored credentials (wandb reads ~/.netrc)
    ("INSTRUMENTED_ADAMW_CACHE", "kernels"),  # the CPU kernel is built by this session, not found from an earlier one
):
    os.environ[var] = os.path.join(_HOME, sub)
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
