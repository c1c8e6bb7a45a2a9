"""Run directories as data: what the trainer, a user's loop with ``ForceMonitor`` or the HF callback wrote.

A run directory holds ``metrics.jsonl`` (always), ``forces.jsonl`` and ``weibull.jsonl`` (when logged), and, from
our trainer, ``config.yaml``. The logs may also be compressed (``metrics.jsonl.xz`` / ``.gz``: how ``results/``
stores committed runs). Analyses and figures read runs through :func:`load_run` only.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instrumented_adamw.sinks import read_jsonl
from instrumented_adamw.utils.extras import require


@dataclass
class RunLog:
    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    forces: list[dict[str, Any]]
    weibull: list[dict[str, Any]]

    @property
    def lr(self) -> float | None:
        """The run's peak lr: from ``config.yaml`` (our trainer), else the largest logged ``lr`` (a user's loop, the
        HF callback), else None."""
        lr = self.config.get("optim", {}).get("lr")
        if lr is not None:
            return float(lr)
        logged = [m.get("lr", m.get("learning_rate")) for m in self.metrics]
        logged = [float(v) for v in logged if isinstance(v, (int, float)) and math.isfinite(v)]
        return max(logged) if logged else None

    @property
    def weight_decay(self) -> float | None:
        wd = self.config.get("optim", {}).get("weight_decay")
        return None if wd is None else float(wd)

    @property
    def seed(self) -> int | None:
        return self.config.get("run", {}).get("seed")

    @property
    def total_steps(self) -> int:
        """Planned length (``schedule.total_steps``), else the last logged step."""
        planned = self.config.get("schedule", {}).get("total_steps")
        if planned:
            return int(planned)
        steps = [r["step"] for r in (*self.metrics, *self.forces, *self.weibull)]
        return max(steps, default=0)

    @property
    def label(self) -> str:
        """``name (seed S, lr X)`` with whatever of seed and lr the run directory records."""
        parts = [f"seed {self.seed}"] if self.seed is not None else []
        if self.lr is not None:
            parts.append(f"lr {self.lr:g}")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


#: Compressed logs (complete files written once, so no torn tail to tolerate) and how to open them.
_COMPRESSED = {".xz": lzma.decompress, ".gz": gzip.decompress}


def log_file(path: str | Path, kind: str) -> Path | None:
    """``kind.jsonl`` of a run directory, or its compressed form; None when there is neither."""
    for suffix in ("", *_COMPRESSED):
        f = Path(path) / f"{kind}.jsonl{suffix}"
        if f.is_file():
            return f
    return None


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a plain (``read_jsonl``: a torn last line is ignored) or compressed JSONL log."""
    decompress = _COMPRESSED.get(path.suffix)
    if decompress is None:
        return read_jsonl(path)
    return [json.loads(line) for line in decompress(path.read_bytes()).decode("utf-8").splitlines() if line.strip()]


def load_run(path: str | Path) -> RunLog:
    path = Path(path)
    if log_file(path, "metrics") is None:
        raise FileNotFoundError(f"{path} is not a run directory (no metrics.jsonl)")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        config = require("yaml", "reading a run's config.yaml").safe_load((path / "config.yaml").read_text()) or {}

    def read(kind):
        f = log_file(path, kind)
        return read_log(f) if f is not None else []

    # The HF callback writes into <output_dir>/forces: name such a run after its output directory.
    default = path.parent.name if path.name == "forces" and path.parent.name else path.name
    name = config.get("run", {}).get("name", default)
    return RunLog(path, name, config, read("metrics"), read("forces"), read("weibull"))


@dataclass
class PackedRun:
    """A run as committed under ``results/``: its folder (compact logs, read lazily as :attr:`log`), its
    ``run.json`` record (command, commit, device, resolved config, ...) and its ``analysis.json``."""

    name: str
    path: Path
    record: dict[str, Any]
    analysis: dict[str, Any]
    _log: RunLog | None = None

    @property
    def log(self) -> RunLog:
        if self._log is None:
            self._log = load_run(self.path)
        return self._log

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config", {})

    @classmethod
    def load(cls, folder: Path) -> PackedRun:
        """The packed run in ``folder`` (``run.json``, and ``analysis.json`` or ``analysis.json.xz`` if present)."""
        analysis = next((read_json(a) for a in (folder / "analysis.json", folder / "analysis.json.xz") if a.is_file()),
                        {})  # fmt: skip
        return cls(folder.name, folder, read_json(folder / "run.json"), analysis)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file, ``xz``-compressed when its name ends in ``.xz``."""
    raw = path.read_bytes()
    return json.loads(lzma.decompress(raw) if path.suffix == ".xz" else raw)
