"""Figures and tables from run directories: ``instrumented-adamw report RUN_DIR [RUN_DIR ...]``.

The computations are importable functions over :class:`~instrumented_adamw.analysis.runs.RunLog` (what the figures
plot is
what they return); the figure code is a thin layer on top. Output: PNGs and one self-contained HTML page (images
embedded, each with a caption saying what to look at) in ``--out``.

Runs of any length are compared with the papers' 20,000-step runs at the same *fraction* of training, and every
figure and table says so where the lengths differ.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from instrumented_adamw.analysis.paper_numbers import (
    PAPER_BUDGET,
    PAPER_BUDGET_PRE_UPDATE,
    PAPER_PEAK_LAMBDA,
    PAPER_RISE_ALIGN,
    PAPER_RISE_FRACTION,
    PAPER_TOTAL_STEPS,
    TABLE_STEPS,
    paper_step_at,
)
from instrumented_adamw.analysis.plotting import colors, plt, save_figure
from instrumented_adamw.analysis.runs import RunLog, load_run
from instrumented_adamw.weibull.fit import half_normal_anchor

__all__ = [
    "PAPER_BUDGET",
    "RunLog",
    "force_series",
    "k_band",
    "lambda_series",
    "load_run",
    "make_report",
    "peak_lambda",
    "share_table",
]


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
        fraction=steps / max(run.total_steps, 1),
        align=np.abs(col("align")) / n,
        inject=col("inject") / n,
        decay=np.abs(col("decay")) / n,
        align_share=100 * col("align_share"),
        inject_share=100 * col("inject_share"),
        decay_share=100 * col("decay_share"),
        rms=col("rms"),
    )


def share_table(run: RunLog, cls: str = "Transmission", steps=TABLE_STEPS) -> list[dict[str, Any]]:
    """Our (align, inject, decay) shares in % at the same fraction of training as each of the paper's steps.

    Each row: ``paper_step``, ``fraction`` of training, ``step`` (ours: the logged interval ending nearest to that
    fraction, within half a log interval), ``ours`` and ``rms`` (None with a ``why`` when no record is near
    enough), and the paper's shares (post-update W; ``paper_pre`` recomputed with pre-update W).
    """
    series = force_series(run, cls)
    logged = series["step"]
    spacing = float(np.median(np.diff(logged))) if len(logged) > 1 else float(logged[0])
    out = []
    for paper_step in steps:
        target = paper_step_at(paper_step, run.total_steps)
        i = int(np.argmin(np.abs(logged - target)))
        row: dict[str, Any] = dict(
            paper_step=paper_step, fraction=paper_step / PAPER_TOTAL_STEPS, target=target, step=None, ours=None,
            rms=None, paper=PAPER_BUDGET[paper_step], paper_pre=PAPER_BUDGET_PRE_UPDATE.get(paper_step), why=None,
        )  # fmt: skip
        if abs(logged[i] - target) <= spacing / 2 and target > 0:
            row.update(
                step=int(logged[i]),
                ours=tuple(float(series[k][i]) for k in ("align_share", "inject_share", "decay_share")),
                rms=float(series["rms"][i]),
            )
        elif target > run.total_steps:
            row["why"] = f"the run ends at step {run.total_steps}"
        else:
            row["why"] = (
                f"no force record near step {target} (logged every {spacing:g} steps; the nearest is {logged[i]})"
            )
        out.append(row)
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


def _fraction_note(run: RunLog) -> str:
    if run.total_steps == PAPER_TOTAL_STEPS:
        return ""
    return f" (at the same fraction of training: {run.total_steps:,}-step run vs the paper's {PAPER_TOTAL_STEPS:,})"


# ---------------------------------------------------------------------------------------------- figures
def figure_forces(run: RunLog, path: Path, cls: str = "Transmission") -> dict[str, np.ndarray]:
    pyplot = plt()
    s = force_series(run, cls)
    fig, (ax1, ax2) = pyplot.subplots(2, 1, figsize=(8, 7), sharex=True)
    c = colors(3)
    ax1.semilogy(s["step"], s["align"], color=c[0], label="|align| = |−2η⟨W,û⟩|")
    ax1.semilogy(s["step"], s["inject"], color=c[1], label="inject = η²‖û‖²")
    ax1.semilogy(s["step"], s["decay"], color=c[2], label="|decay| = 2ηλ‖W‖²")
    ax1.set_ylabel("force magnitude (Δ‖W‖² per step)")
    ax1.set_title(f"{run.name}: {cls} force budget")
    ax1.legend()
    ax1.grid(alpha=0.3, which="both")
    ax2.stackplot(
        s["step"], s["align_share"], s["inject_share"], s["decay_share"], labels=["align", "inject", "decay"],
        colors=c, alpha=0.75,
    )  # fmt: skip
    marks = np.array([(paper_step_at(st, run.total_steps), v[0]) for st, v in PAPER_BUDGET.items()])
    label = "paper Table 2 align (post-update W)" + (
        "" if run.total_steps == PAPER_TOTAL_STEPS else ",\n at the same fraction of training"
    )
    ax2.plot(marks[:, 0], marks[:, 1], "kx", markersize=8, mew=2, label=label)
    ax2.set_ylabel("share of |align| + inject + |decay| (%)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylim(0, 100)
    ax2.legend(loc="lower left")
    save_figure(fig, path)
    return s


def figure_align_share(runs: list[RunLog], path: Path, cls: str = "Transmission") -> dict[str, np.ndarray]:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(8, 4.5))
    plotted = {}
    for run, c in zip(runs, colors(len(runs)), strict=True):
        s = force_series(run, cls)
        ax.plot(100 * s["fraction"], s["align_share"], color=c, label=run.label, lw=1.2)
        plotted[run.name] = s["align_share"]
    lo, hi = PAPER_RISE_ALIGN
    rise = 100 * PAPER_RISE_FRACTION
    ax.fill_between(
        [0, rise], lo, hi, color="grey", alpha=0.25, label=f"paper: rise phase (first {rise:g}%) {lo}–{hi}%"
    )
    ax.set_xlabel("fraction of training (%)")
    ax.set_ylabel(f"{cls} align share (%)")
    ax.set_title(f"{cls} align share over training, against the papers' rise-phase band")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return plotted


def figure_lambda(run: RunLog, path: Path, cls: str = "Transmission", trim: float = 0.1):
    pyplot = plt()
    series = lambda_series(run, cls)
    band = k_band(run, cls)
    fig, (ax1, ax2) = pyplot.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    layers = sorted({layer for layer, _ in series if layer is not None})
    palette = dict(zip(layers, colors(len(layers)), strict=True))
    line_styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    styles = {c: line_styles[i % len(line_styles)] for i, c in enumerate(sorted({c for _, c in series}, key=str))}
    for (layer, comp), d in series.items():
        ax1.plot(d["step"], d["lam"], color=palette.get(layer, "k"), ls=styles.get(comp, "-"), lw=1.2,
                 label=f"L{layer} {comp}")  # fmt: skip
    ax1.set_ylabel("Weibull scale λ (weight units)")
    ax1.set_title(f"{run.name}: {cls} λ(t), mid-80 fits\ncolour = layer, line style = component")
    ax1.legend(fontsize=7, ncol=max(1, min(4, len(series) // 6 + 1)))
    ax1.grid(alpha=0.3)
    ax2.fill_between(band["step"], band["k_min"], band["k_max"], alpha=0.3, label="k range over blocks")
    ax2.plot(band["step"], band["k_median"], color=colors(1)[0], label="median k")
    k0, _ = half_normal_anchor(trim)
    ax2.axhline(k0, color="#d62728", ls="--", label=f"half-normal anchor k₀ = {k0:.4f}")
    ax2.set_ylabel("Weibull shape k")
    ax2.set_xlabel("optimizer step")
    ax2.legend()
    ax2.grid(alpha=0.3)
    save_figure(fig, path)
    return series, band


def figure_peak_lambda(runs: list[RunLog], path: Path, cls: str = "Transmission") -> dict[float, float]:
    pyplot = plt()
    peaks: dict[float, list[float]] = {}
    for run in runs:
        peaks.setdefault(run.lr, []).append(peak_lambda(run, cls)[1])
    ours = {lr: float(np.mean(v)) for lr, v in sorted(peaks.items())}
    lengths = sorted({r.total_steps for r in runs})
    ours_label = "ours, median over blocks (" + "/".join(f"{n:,}" for n in lengths) + "-step runs)"
    fig, ax = pyplot.subplots(figsize=(6.5, 4.5))
    ax.loglog(list(ours), list(ours.values()), "o-", color=colors(1)[0], label=ours_label)
    ax.loglog(list(PAPER_PEAK_LAMBDA), list(PAPER_PEAK_LAMBDA.values()), "ks--",
              label=f"paper, pooled fit ({PAPER_TOTAL_STEPS:,}-step runs)")  # fmt: skip
    ticks = sorted(set(ours) | set(PAPER_PEAK_LAMBDA))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate η")
    ax.set_ylabel(f"peak {cls} λ (weight units)")
    ax.set_title(
        "peak λ against learning rate"
        + (" (run lengths differ: compare slopes)" if lengths != [PAPER_TOTAL_STEPS] else "")
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
    return ours


#: What to look at in each figure (the HTML page's captions), by file-name prefix.
CAPTIONS = {
    "forces": "Top: the three forces per step on a log scale — alignment (learning signal), injection (step size) "
    "and decoupled decay. Bottom: their shares of the budget; × marks the papers' Table 2 alignment shares. While "
    "weights grow, alignment dominates; decay catches up as ‖W‖ approaches its equilibrium.",
    "lambda": "Top: the Weibull scale λ of every Transmission block. Look for the rise, the peak and the "
    "relaxation. Bottom: the shape k stays near the half-normal anchor k₀ = 1.2054 while λ moves.",
    "closed_loop": "λ predicted by integrating the logged forces from ‖W‖²(0) (lines) against the fitted λ (dots). "
    "Solid: exact pre-update bookkeeping; dotted: the published post-update bookkeeping, which over-counts growth.",
    "align_share": "Alignment share of every run against the fraction of training, with the papers' rise-phase band "
    "(first quarter of their runs). Runs of different lengths are comparable on this axis.",
    "peak_lambda_vs_lr": "Peak λ against the learning rate; the papers' points are 20,000-step runs, ours may be "
    "shorter: compare the slope (λ_peak ∝ η^0.78 in the papers), not the level.",
}


#: Each figure's heading on the HTML page, by file-name prefix ("{run}": the rest of the file name).
HEADINGS = {
    "forces": "Force budget: alignment, injection, decay ({run})",
    "lambda": "Weibull scale λ and shape k per block ({run})",
    "closed_loop": "Closed loop: λ predicted from the forces against the fits ({run})",
    "align_share": "Alignment share against the fraction of training",
    "peak_lambda_vs_lr": "Peak λ against the learning rate",
}


def _heading(stem: str) -> str:
    for prefix in sorted(HEADINGS, key=len, reverse=True):
        if stem == prefix or stem.startswith(prefix + "_"):
            return HEADINGS[prefix].format(run=stem[len(prefix) + 1 :] or "all runs")
    return stem.replace("_", " ")


def _caption(stem: str) -> str:
    for prefix in sorted(CAPTIONS, key=len, reverse=True):
        if stem.startswith(prefix):
            return CAPTIONS[prefix]
    return ""


# ---------------------------------------------------------------------------------------------- report
def make_report(run_dirs: list[str | Path], out: str | Path, cls: str = "Transmission") -> dict[str, Any]:
    """All figures and the share table for ``run_dirs``; returns what was plotted and the files written."""
    from instrumented_adamw.analysis.analyze import figure_closed_loop

    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = dict(files=[], data={}, skipped={})
    for run in runs:
        p = out / f"forces_{run.name}.png"
        result["data"][f"forces/{run.name}"] = figure_forces(run, p, cls)
        result["files"].append(p)
        if any(b["cls"] == cls for rec in run.weibull for b in rec["blocks"]):
            p = out / f"lambda_{run.name}.png"
            result["data"][f"lambda/{run.name}"] = figure_lambda(run, p, cls)
            result["files"].append(p)
        else:
            result["skipped"][f"lambda_{run.name}"] = f"no Weibull fits of {cls} blocks in weibull.jsonl"
        try:
            p = out / f"closed_loop_{run.name}.png"
            result["data"][f"closed_loop/{run.name}"] = figure_closed_loop(run, p, cls)
            result["files"].append(p)
        except ValueError as exc:  # no step-0 fit or no per-tensor records: say so, draw the rest
            result["skipped"][f"closed_loop_{run.name}"] = str(exc)
    p = out / "align_share.png"
    result["data"]["align_share"] = figure_align_share(runs, p, cls)
    result["files"].append(p)
    with_fits = [r for r in runs if r.weibull and r.lr is not None]
    if len({r.lr for r in with_fits}) >= 2:
        p = out / "peak_lambda_vs_lr.png"
        result["data"]["peak_lambda"] = figure_peak_lambda(with_fits, p, cls)
        result["files"].append(p)
    else:
        result["skipped"]["peak_lambda_vs_lr"] = "needs runs with Weibull fits at two or more learning rates"
    tables = {run.name: share_table(run, cls) for run in runs}
    result["tables"] = tables
    page = out / "report.html"
    page.write_text(_html(runs, result["files"], tables, cls, result["skipped"]), encoding="utf-8")
    result["files"].append(page)
    return result


def _html(runs: list[RunLog], files: list[Path], tables: dict, cls: str, skipped: dict[str, str]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>instrumented-adamw report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 8px;text-align:right}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}img{max-width:100%}"
        "figcaption{color:#333;margin-bottom:1.5em}.why{color:#777;text-align:left}</style></head><body>",
        f"<h1>Force budgets and Weibull scales: {html.escape(', '.join(r.name for r in runs))}</h1>",
        f"<h2>{cls} budget shares (%) at the paper's points of training</h2>",
        "<p>Ours: the logged interval ending nearest to the same fraction of training as the paper's step, exact "
        "pre-update bookkeeping. Paper: Table 2 of arXiv 2606.19367 (post-update W) and, in brackets, the released "
        f"logs recomputed with pre-update W; their runs are {PAPER_TOTAL_STEPS:,} steps, wikitext-103, fp32.</p>",
    ]
    for run in runs:
        rows = tables[run.name]
        parts.append(f"<h3>{html.escape(run.label)}{html.escape(_fraction_note(run))}</h3>")
        parts.append("<table><tr><th>paper step</th><th>fraction</th><th>our step</th><th>RMS</th><th>align</th>"
                     "<th>inject</th><th>decay</th><th>paper align</th><th>paper inject</th><th>paper decay</th>"
                     "</tr>")  # fmt: skip
        for r in rows:
            paper = zip(r["paper"], r["paper_pre"] or (None, None, None), strict=True)
            paper_cells = [f"{p:.1f}" + (f" ({q:.1f})" if q is not None else "") for p, q in paper]
            head = f"<tr><td>{r['paper_step']:,}</td><td>{100 * r['fraction']:g}%</td>"
            if r["ours"] is None:
                cells = f"<td colspan='5' class='why'>{html.escape(r['why'])}</td>"
            else:
                ours = [f"{r['step']:,}", f"{r['rms']:.4f}", *(f"{v:.1f}" for v in r["ours"])]
                cells = "".join(f"<td>{c}</td>" for c in ours)
            parts.append(head + cells + "".join(f"<td>{c}</td>" for c in paper_cells) + "</tr>")
        parts.append("</table>")
    for f in files:
        if f.suffix == ".png":
            data = base64.b64encode(f.read_bytes()).decode()
            parts.append(
                f"<h2>{html.escape(_heading(f.stem))}</h2><figure><img alt='{html.escape(f.stem)}' "
                f"src='data:image/png;base64,{data}'><figcaption>{html.escape(_caption(f.stem))}</figcaption></figure>"
            )
    for what, why in skipped.items():
        parts.append(f"<p><b>{html.escape(what)}</b> not drawn: {html.escape(why)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
