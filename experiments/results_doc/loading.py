"""The committed ``results/`` loaded for the generator: campaign runs, checks, benchmarks, windows, and the dry run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instrumented_adamw.analysis.runs import PackedRun, read_json
from instrumented_adamw.utils.extras import require

#: The paper steps the share table reports (the released logs' pre-update recomputation exists at each).
SHARE_STEPS = (250, 2500, 5000, 10_000, 20_000)
#: The rise phase's table steps (≤ 5000 of 20,000: the first quarter).
RISE_STEPS = (250, 1250, 2500, 5000)
#: The issue's targets (issue 14), not the papers' numbers: a missed one is reported with the measured figure.
TARGETS = dict(rise_band=(88.0, 94.0), seed_spread=1.5, closed_loop=0.015, spline_s1000=0.97)
COMMAND = "`make gpu-evidence` in a GPU window (docs/gpu_evidence.md), then `python -m experiments.gpu_evidence unpack`"
BENCH_BEGIN = "<!-- BEGIN GENERATED: GPU benchmarks (make results; edit results/, not this block) -->"
BENCH_END = "<!-- END GENERATED: GPU benchmarks -->"


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class RunResult(PackedRun):
    @property
    def group(self) -> str:
        return self.record.get("group", "other")

    @property
    def arch(self) -> str:
        return self.config.get("model", {}).get("arch", "?")

    @property
    def lr(self) -> float:
        return float(self.config.get("optim", {}).get("lr", math.nan))

    @property
    def wd(self) -> float:
        return float(self.config.get("optim", {}).get("weight_decay", math.nan))

    @property
    def dry(self) -> bool:
        return bool(self.record.get("dry_run"))

    @property
    def label(self) -> str:
        return f"`{self.name}`" + (" (CPU dry run)" if self.dry else "")


@dataclass
class Results:
    root: Path
    runs: dict[str, RunResult] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)  # provenance + checks.json
    bench: list[dict[str, Any]] = field(default_factory=list)  # provenance + result.json
    windows: list[dict[str, Any]] = field(default_factory=list)
    campaign: list[dict[str, Any]] = field(default_factory=list)  # name, group, why, spline (priority order)
    dry: Results | None = None

    def group(self, name: str) -> list[RunResult]:
        order = [c["name"] for c in self.campaign]
        runs = [r for r in self.runs.values() if r.group == name]
        return sorted(runs, key=lambda r: (order.index(r.name) if r.name in order else len(order), r.name))

    def note(self, section: str) -> str:
        f = self.root / "notes" / f"{section}.md"
        return f.read_text().strip() if f.is_file() else ""


def load_results(root: str | Path, campaign: str | Path | None = None, *, dry: bool = True) -> Results:
    """Everything committed under ``root`` (and ``root/dry_run`` as :attr:`Results.dry`)."""
    root = Path(root)
    res = Results(root)
    for f in sorted(root.glob("runs/*/run.json")):
        res.runs[f.parent.name] = RunResult.load(f.parent)
    for f in sorted(root.glob("checks/*/provenance.json")):
        res.checks.append(dict(read_json(f), **read_json(f.parent / "checks.json"), folder=f.parent.relative_to(root)))
    for f in sorted(root.glob("bench/*/*/provenance.json")):
        result = f.parent / "result.json"
        res.bench.append(
            dict(
                read_json(f), result=read_json(result) if result.is_file() else None, folder=f.parent.relative_to(root)
            )
        )
    res.windows = [read_json(f) for f in sorted(root.glob("windows/*.json"))]
    if campaign is not None and Path(campaign).is_file():
        tree = require("yaml", "reading configs/campaign.yaml").safe_load(Path(campaign).read_text()) or {}
        for r in tree.get("runs", {}).get("list", []):
            res.campaign.append(
                dict(
                    name=r["name"],
                    group=r.get("group", "other"),
                    why=" ".join(str(r.get("why", "")).split()),
                    spline=bool(r.get("spline")),
                )
            )
    if dry and (root / "dry_run").is_dir():
        res.dry = load_results(root / "dry_run", campaign, dry=False)
    return res
