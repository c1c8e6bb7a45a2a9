"""Where monitor records go: JSONL files (always), wandb, TensorBoard — behind one two-method interface.

A sink has ``log(kind, record, step)`` and ``close()``. ``kind`` is ``"metrics"`` (flat scalars: loss, lr, shares
per class, ...), ``"forces"`` (nested per class / layer / tensor) or ``"weibull"`` (per-block fits). Requested
sinks that cannot work raise at construction, with the reason; a sink that fails mid-run is reported once and
dropped by :class:`FanOut`, so training and the JSONL files continue (observability never fails silently, and
never takes training down with it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from instrumented_adamw.taxonomy import CLASSES
from instrumented_adamw.utils import netcheck
from instrumented_adamw.utils.durable_io import fsync_dir, truncate_durably, write_durably

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
    """Append-only ``<kind>.jsonl`` files in ``directory``, one object per line, flushed per record.

    Durability: a flushed record is the kernel's, so a killed process (``kill -9``) loses nothing. Against a power
    loss the files are fsync'd where it matters, by default (``fsync="marks"``): whenever :meth:`marks` is taken
    (the trainer saves them in each checkpoint, so a checkpoint never points at bytes that are not on disk),
    on :meth:`sync` (the HF callback calls it at each Trainer save) and on :meth:`close`. ``fsync=True`` fsyncs
    every record as well (a millisecond or more per log on a network disk); ``False`` never.

    Resume-safe in two ways. ``resume_step=S`` drops every record with a step after ``S`` (written after the
    checkpoint the run continues from), parsing the files. ``marks`` (what :meth:`marks` returned when that checkpoint
    was saved) cuts each file back to exactly the bytes it had then: exact without parsing, and checkable first with
    :func:`instrumented_adamw.utils.durable_io.check_prefix` (the trainer's way). Either way a torn last line (a kill
    mid-write) is dropped, so the resumed run writes each step exactly once and leaves no gap; a step not after the
    last one written raises instead of duplicating it. Without either, records are appended after the files' last.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        resume_step: int | None = None,
        fsync: bool | str = "marks",
        *,
        marks: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if resume_step is not None and marks is not None:
            raise ValueError("pass resume_step or marks, not both")
        if not (isinstance(fsync, bool) or fsync == "marks"):  # not 1 or 0: they would pass `in (True, False)`
            raise ValueError(f"fsync must be 'marks' (at marks, sync and close), True (every record too) or False, "
                             f"got {fsync!r}")  # fmt: skip
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._files: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        self._size: dict[str, int] = {}
        self._digest: dict[str, Any] = {}
        for kind in KINDS:
            path = self.path(kind)
            if marks is not None:
                want = int(marks.get(kind, {}).get("bytes", 0))
                size = path.stat().st_size if path.exists() else 0
                if size < want:
                    raise ValueError(f"{path} has {size} bytes, fewer than the {want} of the checkpoint's mark")
                if path.exists():
                    truncate_durably(path, want)
                    _drop_torn_tail(path)  # a no-op after a mark; not when the file was shorter than it
            elif resume_step is not None and path.exists():
                truncate_jsonl(path, resume_step)
            elif path.exists():
                _drop_torn_tail(path)
            self._digest[kind] = hashlib.sha256()
            self._size[kind] = 0
            self._last[kind] = -1
            if path.exists():
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        self._digest[kind].update(chunk)
                        self._size[kind] += len(chunk)
                self._last[kind] = _last_step(path)

    def path(self, kind: str) -> Path:
        return self.directory / f"{kind}.jsonl"

    def marks(self) -> dict[str, dict[str, Any]]:
        """Per kind, the length and SHA-256 of what the file holds now: saved with a checkpoint, it lets a resumed
        run check that the logs are still the ones written and cut them back to that moment exactly. The files are
        synced first (see :meth:`sync`)."""
        self.sync()
        return {kind: dict(bytes=self._size[kind], sha256=self._digest[kind].hexdigest()) for kind in KINDS}

    def sync(self) -> None:
        """Put every record written so far on disk (unless ``fsync=False``)."""
        if self._fsync is False:
            return
        for fh in self._files.values():
            fh.flush()
            os.fsync(fh.fileno())

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
        last = self._last.get(kind, -1)
        if step <= last:
            raise ValueError(f"{self.path(kind)}: step {step} is not after the last written step {last}")
        fh = self._files.get(kind)
        if fh is None:
            created = not self.path(kind).exists()
            fh = self._files[kind] = self.path(kind).open("ab")
            if created and self._fsync is not False:
                fsync_dir(self.directory)  # the new file's name must survive a power loss too
        line = json.dumps(_finite(dict(record, step=step)), default=_json_default, allow_nan=False)
        data = (line + "\n").encode("utf-8")
        fh.write(data)
        fh.flush()
        if self._fsync is True:
            os.fsync(fh.fileno())
        self._digest[kind].update(data)
        self._size[kind] += len(data)
        self._last[kind] = step

    def close(self) -> None:
        self.sync()
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a kill mid-write) is ignored, any other bad line raises."""
    lines = Path(path).read_bytes().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object") from None
    return out


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep the records with ``step`` ≤ ``step`` (atomically and durably rewritten); returns the last step kept
    (−1: none)."""
    kept = [r for r in read_jsonl(path) if r["step"] <= step]
    write_durably(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept).encode("utf-8"))
    return max((r["step"] for r in kept), default=-1)


def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a kill mid-write): appending after it would bury it mid-file."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
    end = _line_start(path, size)
    truncate_durably(path, end)


def _line_start(path: Path, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 if there is none)."""
    with path.open("rb") as fh:
        pos = end
        while pos > 0:
            start = max(0, pos - (1 << 16))
            fh.seek(start)
            chunk = fh.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            pos = start
    return 0


def _last_step(path: Path) -> int:
    """Step of the file's last record (−1 for an empty file); reads only the last line."""
    size = path.stat().st_size
    if size == 0:
        return -1
    start = _line_start(path, size - 1)
    with path.open("rb") as fh:
        fh.seek(start)
        line = fh.read(size - start)
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: the last line is not a record with a step") from None


#: wandb modes that need no server (``dryrun`` is wandb's old name for offline).
_WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")


class WandbSink:
    """Live wandb logging: the flat metrics every log step; per-tensor and per-layer forces as tables every
    ``table_every`` steps (wandb caps the size of one ``log`` call and of a run's history rows, so the detail is
    periodic while the aggregates stream live); per-block Weibull fits as a table with each fit.

    ``wandb.init`` runs here, so a requested wandb that cannot start (not installed, not logged in, bad mode)
    fails at start-up. In online mode the server (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) is probed
    first: unreachable, it fails within seconds instead of after wandb's minutes of retries. Offline mode
    (``mode="offline"`` or ``WANDB_MODE=offline``) writes a local run file that ``wandb sync`` uploads later.
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
        effective = mode or os.environ.get("WANDB_MODE") or "online"
        server = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        if effective not in _WANDB_LOCAL_MODES and not netcheck.endpoint_reachable(server):
            where = f"{directory}/wandb" if directory is not None else "the wandb directory"
            raise RuntimeError(
                f"wandb logging was requested in {effective} mode but the wandb server {server} does not answer "
                f"(no connection within {netcheck.PROBE_TIMEOUT_S:g} s). Log offline instead: "
                f"logging.wandb_mode=offline (WANDB_MODE=offline), then `wandb sync {where}` on a machine with "
                "network; or logging.wandb=false."
            )
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
        self._peaked: set[str] = set()  # keys seen (those given a max summary among them)

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        wandb = self._wandb
        if kind == "metrics":
            if not self._defined:
                self._define_metrics()
            scalars = {wandb_key(k): v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
            for key in scalars.keys() - self._peaked:
                if key.startswith("forces/") and key.endswith(("/rms", "/update_weight_ratio")):
                    self.run.define_metric(key, step_metric="trainer/step", summary="last,max")
                self._peaked.add(key)
            self.run.log(dict(scalars, **{"trainer/step": step}))
            for alert in record.get("alerts", ()):
                self._alert(alert)
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

    def _define_metrics(self) -> None:
        """Every key on the ``trainer/step`` axis; run summaries that read at a glance: the last value of each
        force metric, and (defined per key as they first appear: wandb takes globs only as suffixes) the largest
        RMS and update/weight ratio of each class."""
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        self.run.define_metric("forces/*", step_metric="trainer/step", summary="last")
        self._defined = True

    def _alert(self, alert: dict[str, Any]) -> None:
        """A wandb alert (e-mail / Slack where the user set them up; recorded in the run offline)."""
        level = getattr(getattr(self._wandb, "AlertLevel", None), "WARN", None)
        title = f"{alert['class']}: {alert['kind']}"
        try:
            self.run.alert(title=title, text=alert["message"], level=level, wait_duration=0)
        except Exception as exc:  # an alert wandb refuses (rate limit, ...) must not drop the metrics with it
            print(f"[instrumented-adamw] wandb did not take the alert {title!r}: {exc}", file=sys.stderr)

    def close(self) -> None:
        self.run.finish()


def wandb_key(key: str) -> str:
    """The monitor's ``<class>/<metric>`` under ``forces/<class>/<metric>``, so that wandb files them in one
    section; every other key (loss, lr, a caller's ``val/acc``) as it is."""
    if key.split("/", 1)[0] in CLASSES and "/" in key:
        return f"forces/{key}"
    return key


#: The dashboard TensorBoardSink lays out (TensorBoard's "Custom Scalars" tab): category -> chart -> tag regexes,
#: one line per class in each chart.
TENSORBOARD_LAYOUT = {
    "Force budget (share of |align| + inject + |decay|)": {
        "align share": [r"^[^/]+/align_share$"],
        "inject share": [r"^[^/]+/inject_share$"],
        "decay share": [r"^[^/]+/decay_share$"],
        "net change of ‖W‖² per interval": [r"^[^/]+/net$"],
    },
    "Norms and steps": {
        "RMS of the weights": [r"^[^/]+/rms$"],
        "RMS over its equilibrium": [r"^[^/]+/rms_over_eq$"],
        "update / weight ratio (last step)": [r"^[^/]+/update_weight_ratio$"],
        "cos(W, û) (last step)": [r"^[^/]+/cos_w_u$"],
    },
    "Timescale": {
        "T/τ so far": [r"^[^/]+/t_over_tau$"],
        "T/τ projected to the end of the schedule": [r"^[^/]+/t_over_tau_end$"],
        "τ_iter = 1/(ηλ), steps": [r"^[^/]+/tau_iter$"],
    },
    "Weibull fits (per-class medians)": {
        "λ (scale)": [r"^weibull/.*/lam_median$"],
        "k (shape)": [r"^weibull/.*/k_median$"],
    },
}


class TensorBoardSink:
    """Scalars of the metrics records as TensorBoard events (``tensorboard --logdir DIR``), with a custom-scalars
    dashboard (:data:`TENSORBOARD_LAYOUT`) and alerts as text (the "Text" tab)."""

    def __init__(self, directory: str | os.PathLike, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError(
                "TensorBoard logging was requested but tensorboard is not installed: pip install tensorboard"
            ) from exc
        # purge_step drops events after a resume point, so a resumed run shows no duplicated steps.
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)
        layout = {category: {title: ["Multiline", tags] for title, tags in charts.items()}
                  for category, charts in TENSORBOARD_LAYOUT.items()}  # fmt: skip
        self.writer.add_custom_scalars(layout)

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        if kind == "weibull":
            record = record.get("summary", {})
        elif kind != "metrics":
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        for alert in record.get("alerts", ()):
            self.writer.add_text(f"alerts/{alert['class']}", f"**{alert['kind']}** — {alert['message']}", step)
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

    def sync(self) -> None:
        """Put what the sinks that keep files (JSONL) have written on disk: before a checkpoint points at it."""
        for sink in self.sinks:
            if hasattr(sink, "sync"):
                sink.sync()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
