"""Figures and tables from run directories: ``instrumented-adamw report RUN_DIR [RUN_DIR ...]``.

The computations are importable functions over :class:`RunLog` (what the figures plot is what they return); the
figure code is a thin layer on top. Output: PNGs and one self-contained HTML page (images embedded) in ``--out``.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._extras import require
from .sinks import read_jsonl
from .weibull import half_normal_anchor

#: Paper Table 2 (arXiv 2606.19367; ../shared/reference/paper_numbers.md): Transmission force budget, % of
#: |align| + inject + |decay|, Pythia-style lr 1e-3, computed by the authors with post-update W.
PAPER_BUDGET = {
    250: (93.1, 4.7, 2.2),
    1250: (93.1, 4.5, 2.4),
    2500: (92.1, 4.5, 3.4),
    5000: (88.7, 4.3, 7.0),
    10000: (78.9, 3.7, 17.5),
    20000: (49.9, 1.5, 48.6),
}
#: The released logs recomputed with pre-update W (exact bookkeeping, as ours), same source.
PAPER_BUDGET_PRE_UPDATE = {
    250: (92.4, 5.1, 2.4),
    2500: (91.3, 4.9, 3.8),
    5000: (87.7, 4.7, 7.6),
    10000: (77.2, 4.0, 18.8),
    20000: (48.4, 1.5, 50.1),
}
#: Rise-phase (steps ≤ 5000) align share range across 4 seeds, Pythia-style, same source.
PAPER_RISE_ALIGN = (88.3, 93.8)
#: Peak pooled Transmission λ against learning rate, same source.
PAPER_PEAK_LAMBDA = {3e-4: 0.0313, 1e-3: 0.0763, 3e-3: 0.1874}
TABLE_STEPS = tuple(PAPER_BUDGET)


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
    def seed(self) -> int | None:
        return self.config.get("run", {}).get("seed")

    @property
    def label(self) -> str:
        """``name (seed S, lr X)`` with whatever of seed and lr the run directory records."""
        parts = [f"seed {self.seed}"] if self.seed is not None else []
        if self.lr is not None:
            parts.append(f"lr {self.lr:g}")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


def load_run(path: str | Path) -> RunLog:
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no metrics.jsonl)")
    config = {}
    if (path / "config.yaml").is_file():
        config = require("yaml", "reading a run's config.yaml").safe_load((path / "config.yaml").read_text())

    def read(kind):
        f = path / f"{kind}.jsonl"
        return read_jsonl(f) if f.is_file() else []

    # The HF callback writes into <output_dir>/forces: name such a run after its output directory.
    default = path.parent.name if path.name == "forces" and path.parent.name else path.name
    name = config.get("run", {}).get("name", default)
    return RunLog(path, name, config or {}, read("metrics"), read("forces"), read("weibull"))


# ---------------------------------------------------------------------------------------------- computations
def force_series(run: RunLog, cls: str = "Transmission") -> dict[str, np.ndarray]:
    """Per-step mean force magnitudes over each logged interval (Δ‖W‖² per step) and the interval shares (%)."""
    rows = [(r["step"], r["classes"][cls]) for r in run.forces if cls in r["classes"]]
    if not rows:
        raise ValueError(f"{run.path}: no {cls} force records")
    steps = np.array([s for s, _ in rows])
    n = np.array([max(c["steps"], 1) for _, c in rows], dtype=np.float64)

    def col(key):
        return np.array([_num(c[key]) for _, c in rows])

    return dict(
        step=steps,
        align=np.abs(col("align")) / n,
        inject=col("inject") / n,
        decay=np.abs(col("decay")) / n,
        align_share=100 * col("align_share"),
        inject_share=100 * col("inject_share"),
        decay_share=100 * col("decay_share"),
        rms=col("rms"),
    )


def share_table(run: RunLog, cls: str = "Transmission", steps=TABLE_STEPS) -> list[dict[str, Any]]:
    """Our (align, inject, decay) shares in % for the interval ending at each step, next to the paper's."""
    series = force_series(run, cls)
    index = {int(s): i for i, s in enumerate(series["step"])}
    out = []
    for step in steps:
        i = index.get(step)
        ours = None if i is None else tuple(float(series[k][i]) for k in ("align_share", "inject_share", "decay_share"))
        rms = None if i is None else float(series["rms"][i])
        out.append(
            dict(step=step, ours=ours, rms=rms, paper=PAPER_BUDGET[step], paper_pre=PAPER_BUDGET_PRE_UPDATE.get(step))
        )
    return out


def lambda_series(run: RunLog, cls: str = "Transmission") -> dict[tuple[int | None, str | None], dict[str, np.ndarray]]:
    """λ(t) and k(t) of every block of a class: {(layer, component): {step, lam, k}}."""
    out: dict[tuple[int | None, str | None], dict[str, list]] = {}
    for rec in run.weibull:
        for b in rec["blocks"]:
            if b["cls"] != cls:
                continue
            d = out.setdefault((b["layer"], b["component"]), dict(step=[], lam=[], k=[]))
            d["step"].append(rec["step"])
            d["lam"].append(b["lam"])
            d["k"].append(b["k"])
    return {key: {k: np.array(v) for k, v in d.items()} for key, d in sorted(out.items(), key=lambda kv: str(kv[0]))}


def k_band(run: RunLog, cls: str = "Transmission") -> dict[str, np.ndarray]:
    """Per fit step: min, median and max k over the class's blocks, and the median λ."""
    steps, lo, med, hi, lam = [], [], [], [], []
    for rec in run.weibull:
        ks = [b["k"] for b in rec["blocks"] if b["cls"] == cls]
        if ks:
            steps.append(rec["step"])
            lo.append(min(ks))
            med.append(float(np.median(ks)))
            hi.append(max(ks))
            lam.append(float(np.median([b["lam"] for b in rec["blocks"] if b["cls"] == cls])))
    return dict(step=np.array(steps), k_min=np.array(lo), k_median=np.array(med), k_max=np.array(hi), lam=np.array(lam))


def peak_lambda(run: RunLog, cls: str = "Transmission") -> tuple[int, float]:
    """(step, value) of the peak median-over-blocks λ of a class."""
    band = k_band(run, cls)
    if not len(band["step"]):
        raise ValueError(f"{run.path}: no Weibull fits of class {cls}")
    i = int(np.argmax(band["lam"]))
    return int(band["step"][i]), float(band["lam"][i])


def _num(v) -> float:
    return math.nan if v is None else float(v)


# ---------------------------------------------------------------------------------------------- figures
def _plt():
    matplotlib = require("matplotlib", "drawing figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Tight layout, PNG at 110 dpi, and close (figures are made in loops over runs: free them)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def figure_forces(run: RunLog, path: Path, cls: str = "Transmission") -> dict[str, np.ndarray]:
    plt = _plt()
    s = force_series(run, cls)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.semilogy(s["step"], s["align"], label="|align| = |−2η⟨W,û⟩|")
    ax1.semilogy(s["step"], s["inject"], label="inject = η²‖û‖²")
    ax1.semilogy(s["step"], s["decay"], label="|decay| = 2ηλ‖W‖²")
    ax1.set_ylabel("force magnitude (Δ‖W‖² per step)")
    ax1.set_title(f"{run.name}: {cls} force budget")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, which="both")
    ax2.stackplot(
        s["step"], s["align_share"], s["inject_share"], s["decay_share"], labels=["align", "inject", "decay"], alpha=0.8
    )
    paper = np.array([(st, *v) for st, v in PAPER_BUDGET.items() if st <= s["step"].max()])
    if len(paper):
        ax2.plot(paper[:, 0], paper[:, 1], "kx", markersize=8, label="paper Table 2 align (post-update W)")
    ax2.set_ylabel("share of |align| + inject + |decay| (%)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylim(0, 100)
    ax2.legend(fontsize=8, loc="lower left")
    save_figure(fig, path)
    return s


def figure_align_share(runs: list[RunLog], path: Path, cls: str = "Transmission") -> dict[str, np.ndarray]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = {}
    for run in runs:
        s = force_series(run, cls)
        ax.plot(s["step"], s["align_share"], label=run.label, lw=1.2)
        plotted[run.name] = s["align_share"]
    lo, hi = PAPER_RISE_ALIGN
    ax.axhspan(lo, hi, color="grey", alpha=0.2, label=f"paper: rise phase (≤ 5k steps) {lo}–{hi}%")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{cls} align share (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return plotted


def figure_lambda(run: RunLog, path: Path, cls: str = "Transmission", trim: float = 0.1):
    plt = _plt()
    series = lambda_series(run, cls)
    band = k_band(run, cls)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    layers = sorted({layer for layer, _ in series if layer is not None})
    cmap = plt.get_cmap("viridis", max(len(layers), 1))
    line_styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    styles = {c: line_styles[i % len(line_styles)] for i, c in enumerate(sorted({c for _, c in series}, key=str))}
    for (layer, comp), d in series.items():
        color = cmap(layers.index(layer)) if layer in layers else "k"
        ax1.plot(d["step"], d["lam"], color=color, ls=styles.get(comp, "-"), lw=1, label=f"L{layer} {comp}")
    ax1.set_ylabel("Weibull scale λ (weight units)")
    ax1.set_title(f"{run.name}: {cls} λ(t) per layer (colour) and component (line style), mid-80 fits")
    ax1.legend(fontsize=6, ncol=4)
    ax1.grid(alpha=0.3)
    ax2.fill_between(band["step"], band["k_min"], band["k_max"], alpha=0.3, label="k range over blocks")
    ax2.plot(band["step"], band["k_median"], "b-", label="median k")
    k0, _ = half_normal_anchor(trim)
    ax2.axhline(k0, color="r", ls="--", label=f"half-normal anchor k₀ = {k0:.4f}")
    ax2.set_ylabel("Weibull shape k")
    ax2.set_xlabel("optimizer step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    save_figure(fig, path)
    return series, band


def figure_peak_lambda(runs: list[RunLog], path: Path, cls: str = "Transmission") -> dict[float, float]:
    plt = _plt()
    peaks: dict[float, list[float]] = {}
    for run in runs:
        peaks.setdefault(run.lr, []).append(peak_lambda(run, cls)[1])
    ours = {lr: float(np.mean(v)) for lr, v in sorted(peaks.items())}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(list(ours), list(ours.values()), "o-", label="ours (median over blocks)")
    ax.loglog(list(PAPER_PEAK_LAMBDA), list(PAPER_PEAK_LAMBDA.values()), "ks--", label="paper (pooled fit)")
    ax.set_xlabel("peak learning rate η")
    ax.set_ylabel(f"peak {cls} λ (weight units)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return ours


# ---------------------------------------------------------------------------------------------- report
def make_report(run_dirs: list[str | Path], out: str | Path, cls: str = "Transmission") -> dict[str, Any]:
    """All figures and the share table for ``run_dirs``; returns what was plotted and the files written."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = dict(files=[], data={})
    for run in runs:
        p = out / f"forces_{run.name}.png"
        result["data"][f"forces/{run.name}"] = figure_forces(run, p, cls)
        result["files"].append(p)
        if any(b["cls"] == cls for rec in run.weibull for b in rec["blocks"]):
            p = out / f"lambda_{run.name}.png"
            result["data"][f"lambda/{run.name}"] = figure_lambda(run, p, cls)
            result["files"].append(p)
        try:
            from .analysis import figure_closed_loop

            p = out / f"closed_loop_{run.name}.png"
            result["data"][f"closed_loop/{run.name}"] = figure_closed_loop(run, p, cls)
            result["files"].append(p)
        except ValueError as exc:  # no step-0 fit or no per-tensor records: say so in the result, draw the rest
            result.setdefault("skipped", {})[f"closed_loop/{run.name}"] = str(exc)
    p = out / "align_share.png"
    result["data"]["align_share"] = figure_align_share(runs, p, cls)
    result["files"].append(p)
    with_fits = [r for r in runs if r.weibull and r.lr is not None]
    if len({r.lr for r in with_fits}) >= 2:
        p = out / "peak_lambda_vs_lr.png"
        result["data"]["peak_lambda"] = figure_peak_lambda(with_fits, p, cls)
        result["files"].append(p)
    tables = {run.name: share_table(run, cls) for run in runs}
    result["tables"] = tables
    page = out / "report.html"
    page.write_text(_html(runs, result["files"], tables, cls, result.get("skipped", {})), encoding="utf-8")
    result["files"].append(page)
    return result


def _html(runs: list[RunLog], files: list[Path], tables: dict, cls: str, skipped: dict[str, str]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>instrumented-adamw report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 8px;text-align:right}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}img{max-width:100%}</style></head><body>",
        f"<h1>Force budgets and Weibull scales: {html.escape(', '.join(r.name for r in runs))}</h1>",
        f"<h2>{cls} budget shares (%) at the paper's steps</h2>",
        "<p>Ours: interval ending at that step, exact pre-update bookkeeping. Paper: Table 2 of arXiv 2606.19367 "
        "(post-update W) and, in brackets, the released logs recomputed with pre-update W. Paper runs: wikitext-103, "
        "fp32; ours: see each run's config.yaml.</p>",
    ]
    for name, rows in tables.items():
        parts.append(f"<h3>{html.escape(name)}</h3><table><tr><th>step</th><th>RMS</th><th>align</th><th>inject</th>"
                     "<th>decay</th><th>paper align</th><th>paper inject</th><th>paper decay</th></tr>")  # fmt: skip
        for r in rows:
            ours = r["ours"] or (None, None, None)
            pre = r["paper_pre"] or (None, None, None)
            cells = [f"{r['rms']:.4f}" if r["rms"] is not None else "—"]
            cells += [f"{v:.1f}" if v is not None else "—" for v in ours]
            paper = zip(r["paper"], pre, strict=True)
            cells += [f"{p:.1f}" + (f" ({q:.1f})" if q is not None else "") for p, q in paper]
            parts.append(f"<tr><td>{r['step']:,}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for f in files:
        if f.suffix == ".png":
            data = base64.b64encode(f.read_bytes()).decode()
            parts.append(
                f"<h2>{html.escape(f.stem)}</h2><img alt='{html.escape(f.stem)}' src='data:image/png;base64,{data}'>"
            )
    for what, why in skipped.items():
        parts.append(f"<p><b>{html.escape(what)}</b> not drawn: {html.escape(why)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
