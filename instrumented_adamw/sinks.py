"""Where monitor records go: JSONL files (always), wandb, TensorBoard — behind one two-method interface.

A sink has ``log(kind, record, step)`` and ``close()``. ``kind`` is ``"metrics"`` (flat scalars: loss, lr, shares
per class, ...), ``"forces"`` (nested per class / layer / tensor) or ``"weibull"`` (per-block fits). Requested
sinks that cannot work raise at construction, with the reason; a sink that fails mid-run is reported once and
dropped by :class:`FanOut`, so training and the JSONL files continue (observability never fails silently, and
never takes training down with it).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

KINDS = ("metrics", "forces", "weibull")


class Sink(Protocol):
    def log(self, kind: str, record: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Does nothing: the default where no sink is wanted."""

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(obj):
    """NaN/Inf → None, so every line is strict JSON (readable by any JSON parser)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class JsonlSink:
    """Append-only ``<kind>.jsonl`` files in ``directory``, one object per line, flushed and fsync'd per record.

    Resume-safe: ``resume_step`` (the step the run continues from; 0 for a fresh start) first drops every record
    with a later step — written after the checkpoint the run resumes from — so the resumed run writes each step
    exactly once and leaves no gap. A step not after the last one written raises instead of duplicating it.
    """

    def __init__(self, directory: str | os.PathLike, resume_step: int | None = None, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._files: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        for kind in KINDS:
            path = self.path(kind)
            if resume_step is not None and path.exists():
                self._last[kind] = truncate_jsonl(path, resume_step)
            elif path.exists():
                self._last[kind] = max((r["step"] for r in read_jsonl(path)), default=-1)

    def path(self, kind: str) -> Path:
        return self.directory / f"{kind}.jsonl"

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
        last = self._last.get(kind, -1)
        if step <= last:
            raise ValueError(f"{self.path(kind)}: step {step} is not after the last written step {last}")
        fh = self._files.get(kind)
        if fh is None:
            fh = self._files[kind] = self.path(kind).open("a", encoding="utf-8")
        line = json.dumps(_finite(dict(record, step=step)), default=_json_default, allow_nan=False)
        fh.write(line + "\n")
        fh.flush()
        if self._fsync:
            os.fsync(fh.fileno())
        self._last[kind] = step

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a kill mid-write) is ignored, any other bad line raises."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object") from None
    return out


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep the records with ``step`` ≤ ``step`` (atomically rewritten); returns the last step kept (−1: none)."""
    kept = [r for r in read_jsonl(path) if r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return max((r["step"] for r in kept), default=-1)


class WandbSink:
    """Live wandb logging: the flat metrics every log step; per-tensor and per-layer forces as tables every
    ``table_every`` steps (wandb caps the size of one ``log`` call and of a run's history rows, so the detail is
    periodic while the aggregates stream live); per-block Weibull fits as a table with each fit.

    ``wandb.init`` runs here, so a requested wandb that cannot start (not installed, not logged in, bad mode)
    fails at start-up. Offline mode (``mode="offline"`` or ``WANDB_MODE=offline``) writes a local run file that
    ``wandb sync`` uploads later.
    """

    def __init__(
        self,
        project: str,
        config: dict[str, Any] | None = None,
        directory: str | os.PathLike | None = None,
        name: str | None = None,
        mode: str | None = None,
        run_id: str | None = None,
        table_every: int = 250,
    ) -> None:
        if table_every < 1:
            raise ValueError(f"table_every must be >= 1, got {table_every}")
        self.table_every = table_every
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("wandb logging was requested but wandb is not installed: pip install wandb") from exc
        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=project,
                config=config,
                dir=str(directory) if directory is not None else None,
                name=name,
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as exc:
            raise RuntimeError(
                f"wandb logging was requested but wandb.init failed: {exc}. Log in (`wandb login`), or run with "
                "WANDB_MODE=offline (logging.wandb_mode=offline) and `wandb sync` later."
            ) from exc
        self._defined = False

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        wandb = self._wandb
        if kind == "metrics":
            if not self._defined:
                self.run.define_metric("*", step_metric="trainer/step")
                self._defined = True
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.run.log(dict(scalars, **{"trainer/step": step}))
        elif kind == "forces" and step % self.table_every == 0:
            keys = ["cls", "layer", "align", "inject", "decay", "align_share", "rms"]
            payload: dict[str, Any] = {"trainer/step": step}
            if record.get("tensors"):
                rows = [[step, name, *(t.get(k) for k in keys)] for name, t in record["tensors"].items()]
                payload["forces/per_tensor"] = wandb.Table(columns=["step", "tensor", *keys], data=rows)
            layer_keys = keys[2:]
            rows = [[step, int(layer), *(a[k] for k in layer_keys)] for layer, a in record["layers"].items()]
            payload["forces/per_layer"] = wandb.Table(columns=["step", "layer", *layer_keys], data=rows)
            self.run.log(payload)
        elif kind == "weibull":
            keys = ["cls", "component", "layer", "k", "lam", "r2", "rms", "lam_over_rms"]
            rows = [[step, b["name"], *(b.get(k) for k in keys)] for b in record["blocks"]]
            table = wandb.Table(columns=["step", "tensor", *keys], data=rows)
            self.run.log(dict(record.get("summary", {}), **{"weibull/per_block": table, "trainer/step": step}))

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Scalars of the metrics records as TensorBoard events (``tensorboard --logdir DIR``)."""

    def __init__(self, directory: str | os.PathLike, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError(
                "TensorBoard logging was requested but tensorboard is not installed: pip install tensorboard"
            ) from exc
        # purge_step drops events after a resume point, so a resumed run shows no duplicated steps.
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        if kind == "weibull":
            record = record.get("summary", {})
        elif kind != "metrics":
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class FanOut:
    """Sends each record to every sink. The first sink (JSONL) must work; any other that raises is reported on
    stderr with its error, dropped, and named in ``failed`` — training goes on."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self.failed: dict[str, str] = {}

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        for i, sink in enumerate(list(self.sinks)):
            if i == 0:
                sink.log(kind, record, step)
                continue
            try:
                sink.log(kind, record, step)
            except Exception as exc:
                name = type(sink).__name__
                self.failed[name] = f"step {step}: {type(exc).__name__}: {exc}"
                self.sinks.remove(sink)
                print(
                    f"[instrumented-adamw] {name} failed at step {step} ({exc}); it is dropped, training and the "
                    f"JSONL logs continue",
                    file=sys.stderr,
                )

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
