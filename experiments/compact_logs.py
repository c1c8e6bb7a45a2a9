"""A finished run as the compact folder that is committed under ``results/``: the same for a campaign run on a GPU
machine (``experiments.gpu_evidence``) and a CPU-study run (``experiments.cpu_study``).

Compact logs (:func:`compact_jsonl`): a run's JSONL logs rewritten with floats to 9 significant digits (a relative
5e-10: below what the fp32 reductions that produced them resolve) and ``time`` to the millisecond, xz-compressed.
That takes a 20,000-step Pythia-70M run's logs (classes and layers every 10 steps, tensors every 250) from about
25 MB to about 3 MB, which is what lets ``results/`` hold the whole campaign and still travel with the token
files to the next window (64 MiB in all). The analyses read the full-precision logs before they are compacted.
"""

from __future__ import annotations

import json
import lzma
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from instrumented_adamw.sinks import read_jsonl

FLOAT_DIGITS = 9
#: The logs a run directory holds (``instrumented_adamw.sinks.KINDS``), each compacted to ``<kind>.jsonl.xz``.
LOG_KINDS = ("metrics", "forces", "weibull")


def _round(obj: Any, key: str | None = None) -> Any:
    if isinstance(obj, float):
        return round(obj, 3) if key == "time" else float(f"{obj:.{FLOAT_DIGITS}g}")
    if isinstance(obj, dict):
        return {k: _round(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def compact_jsonl(src: Path, dst: Path) -> int:
    """``src`` (a run's JSONL log) as ``dst`` (``.jsonl.xz``), floats to 9 significant digits; returns bytes."""
    records = read_jsonl(src)
    text = "".join(json.dumps(_round(r), allow_nan=False, separators=(",", ":")) + "\n" for r in records)
    data = lzma.compress(text.encode("utf-8"), preset=6)
    dst.write_bytes(data)
    return len(data)


def compact_run(run_dir: Path, out: Path, analysis_json: Path, figures: Iterable[Path], *,
                compress_analysis_over: int = 0, shrink_figure=None) -> dict[str, int]:  # fmt: skip
    """Write ``out`` (made empty first): ``config.yaml``, the compact logs, the analysis (xz-compressed above
    ``compress_analysis_over`` bytes; 0: always) and ``figures/`` (each passed through ``shrink_figure`` if given);
    returns the compact logs' sizes in bytes by file name. A missing analysis is recorded as such, not skipped."""
    if out.exists():
        shutil.rmtree(out)
    (out / "figures").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    sizes = {}
    for kind in LOG_KINDS:
        if (run_dir / f"{kind}.jsonl").is_file():
            sizes[f"{kind}.jsonl.xz"] = compact_jsonl(run_dir / f"{kind}.jsonl", out / f"{kind}.jsonl.xz")
    if analysis_json.is_file():
        text = analysis_json.read_text()
    else:
        text = json.dumps(dict(error="the analysis failed: see run.json"))
    if len(text) > compress_analysis_over:
        (out / "analysis.json.xz").write_bytes(lzma.compress(text.encode(), preset=6))
    else:
        (out / "analysis.json").write_text(text)
    for png in figures:
        shutil.copy(png, out / "figures" / png.name)
        if shrink_figure is not None:
            shrink_figure(out / "figures" / png.name)
    return sizes


def run_summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures a results table shows of a run: its last step and loss, last validation loss, median
    throughput and last Transmission align share."""
    last = metrics[-1] if metrics else {}
    tok_s = sorted(m["throughput(tok/s)"] for m in metrics if m.get("throughput(tok/s)"))
    val = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    return dict(steps=last.get("step"), final_loss=last.get("loss"), final_val_loss=val[-1] if val else None,
                median_tok_s=tok_s[len(tok_s) // 2] if tok_s else None,
                transmission_align_share=last.get("Transmission/align_share"))  # fmt: skip
