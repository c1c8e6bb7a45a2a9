"""Where a result came from: the commit, the machine and the versions. One implementation for the trainer's
``env.json``, the experiments' bundles and the benchmarks' JSON, so that every record names the same things the
same way. Nothing heavy is imported here (versions are read from package metadata)."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

#: Packages whose versions a result depends on.
VERSIONED = ("torch", "triton", "transformers", "numpy")


def now_iso() -> str:
    """UTC time to the second, ISO 8601: the timestamp of every record."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, Any]:
    """Python, the platform, CUDA as torch was built, and each of :data:`VERSIONED` (None where not installed)."""
    import torch

    found: dict[str, Any] = dict(python=platform.python_version(), platform=platform.platform())
    found["cuda"] = torch.version.cuda
    found.update({name: package_version(name) for name in VERSIONED})
    found["torch"] = torch.__version__  # the running one (a source build has no matching metadata)
    return found


def device_description(device) -> dict[str, Any]:
    """The device a figure was measured on: its kind and name (the CPU model on CPU), with the GPU's SM count,
    memory and capability where there is one."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = dict(device=device.type, cpu=cpu_name(), cpu_count=os.cpu_count(),
                                threads=torch.get_num_threads())  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")  # fmt: skip
    else:
        info["device_name"] = info["cpu"]
    return info


def commit_info(root: Path, record: Path | None = None) -> dict[str, Any]:
    """The commit the tree at ``root`` is at, and the tracked files that differ from it: from git where there is a
    repository, else from ``record`` (a JSON file written where git was, for machines that get the working tree
    without ``.git``)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")  # fmt: skip
        return dict(sha=sha, dirty=sorted(line[3:] for line in dirty if line.strip()), source="git")
    except (OSError, subprocess.SubprocessError):
        pass
    if record is not None and (root / record).is_file():
        return dict(json.loads((root / record).read_text()), source=f"{record} (written where git was)")
    where = f" and no {record}" if record is not None else ""
    return dict(sha=None, dirty=[], source=f"unknown: no git repository{where}")
