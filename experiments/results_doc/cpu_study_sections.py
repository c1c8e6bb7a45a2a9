"""The CPU study's and the Muon study's sections of ``docs/results.md``, from ``results/cpu_study/``.

``python -m experiments.cpu_study`` (``make study``) packs each run into ``results/cpu_study/<run>/`` (``run.json``
with the
run's ``group`` — adamw or muon — and ``role`` — rise, ttau, ttau_lr_squared — plus compact logs and
``analysis.json.xz``) and draws the study's comparison figures into ``results/cpu_study/figures/``. The sections
here turn those into tables against the study's targets (issue 17, issue 18) and the papers' numbers, comparing
runs of any length at the same *fraction* of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.results_doc.markdown import fmt_f, fmt_g, fmt_shares, met, table
from instrumented_adamw.analysis.paper_numbers import PAPER_BUDGET_PRE_UPDATE, PAPER_RISE_ALIGN, PAPER_TOTAL_STEPS
from instrumented_adamw.analysis.report import force_series, share_table
from instrumented_adamw.analysis.runs import PackedRun, RunLog

CLS = "Transmission"
#: The paper steps whose fraction of training the share table reads (1.25%, 12.5%, 25%, 50%, 100%).
SHARE_STEPS = (250, 2500, 5000, 10_000, 20_000)
#: Issue 17's targets.
RISE_FRACTION = 0.25  # the rise phase: the first quarter of training
RISE_ALIGN_MIN = 85.0  # % Transmission align share, mean over the rise phase
PEAK_BEFORE = 0.8  # class-mean λ peaks before this fraction of training ...
RELAX_MIN = 0.02  # ... and ends at least this far (relative) below its peak
#: The fraction of training over which the late drift of the RMS is measured (the Muon study's lr vs lr² question).
LATE_FRACTION = 0.8
COMMAND = "`make study` (`python -m experiments.cpu_study`)"


@dataclass
class PackedStudyRun(PackedRun):
    @property
    def group(self) -> str:
        return self.record.get("group", "adamw")

    @property
    def role(self) -> str:
        return self.record.get("role", "")

    @property
    def seed(self) -> int:
        return int(self.record.get("seed", 1))

    @property
    def optim(self) -> dict[str, Any]:
        return self.config.get("optim", {})

    @property
    def label(self) -> str:
        return f"`{self.name}`"


def load_study(root: Path) -> list[PackedStudyRun]:
    """Every packed run under ``root`` (``results/cpu_study``), by group, role and seed."""
    runs = [PackedStudyRun.load(f.parent) for f in sorted(root.glob("*/run.json"))]
    return sorted(runs, key=lambda r: (r.group, r.role, r.seed, r.name))


def _of(runs: list[PackedStudyRun], group: str, role: str) -> list[PackedStudyRun]:
    return [r for r in runs if r.group == group and r.role == role]


# ---------------------------------------------------------------------------------------------- measurements
def rise_align(run: RunLog, cls: str = CLS) -> float:
    """Mean align share (%) over the logged intervals that end within the first quarter of training."""
    s = force_series(run, cls)
    keep = s["fraction"] <= RISE_FRACTION
    return float(np.mean(s["align_share"][keep])) if keep.any() else math.nan


def class_lambda(run: RunLog, cls: str = CLS) -> dict[str, np.ndarray]:
    """Per fit step: the mean over the class's blocks of the mid-80 λ and the blocks' k (median, min, max)."""
    steps, lam, k_med, k_lo, k_hi = [], [], [], [], []
    for rec in run.weibull:
        blocks = [b for b in rec["blocks"] if b["cls"] == cls]
        if blocks:
            steps.append(rec["step"])
            lam.append(float(np.mean([b["lam"] for b in blocks])))
            ks = [b["k"] for b in blocks]
            k_med.append(float(np.median(ks)))
            k_lo.append(min(ks))
            k_hi.append(max(ks))
    return dict(step=np.array(steps), lam=np.array(lam), k_median=np.array(k_med), k_min=np.array(k_lo),
                k_max=np.array(k_hi))  # fmt: skip


def lambda_course(run: RunLog, cls: str = CLS) -> dict[str, float]:
    """λ's course: value at step 0, peak (value, step, fraction of training), final, and relaxation
    ``1 − final/peak`` (0 when the peak is the last fit: still rising)."""
    c = class_lambda(run, cls)
    if not len(c["step"]):
        return {}
    i = int(np.argmax(c["lam"]))
    peak, final = float(c["lam"][i]), float(c["lam"][-1])
    return dict(init=float(c["lam"][0]), peak=peak, peak_step=int(c["step"][i]),
                peak_fraction=float(c["step"][i]) / max(run.total_steps, 1), final=final, final_step=int(c["step"][-1]),
                relaxation=1.0 - final / peak)  # fmt: skip


def end_budget(run: RunLog, cls: str = CLS) -> dict[str, float]:
    """The last logged interval's shares (%) and the RMS course: peak, final, late drift over the last 20%."""
    s = force_series(run, cls)
    late = s["fraction"] >= LATE_FRACTION
    rms = s["rms"]
    i_late = int(np.argmax(late)) if late.any() else len(rms) - 1
    return dict(
        align=float(s["align_share"][-1]), inject=float(s["inject_share"][-1]), decay=float(s["decay_share"][-1]),
        rms_final=float(rms[-1]), rms_peak=float(np.max(rms)),
        rms_peak_fraction=float(s["fraction"][int(np.argmax(rms))]),
        late_drift=float(rms[-1] / rms[i_late] - 1.0),
    )  # fmt: skip


def _last_metric(run: RunLog, key: str) -> float | None:
    for m in reversed(run.metrics):
        v = m.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def _spread(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    return fmt_f(max(vals) - min(vals), 2) if len(vals) > 1 else "–"


# ---------------------------------------------------------------------------------------------- sections
def _runs_table(runs: list[PackedStudyRun]) -> str:
    rows = []
    for r in runs:
        o = r.optim
        s = r.record.get("summary", {})
        rows.append([
            r.label, r.role, o.get("name", "adamw"), fmt_g(o.get("lr")), fmt_g(o.get("weight_decay")),
            o.get("weight_decay_schedule", "lr"), fmt_g(_last_metric(r.log, f"{CLS}/t_over_tau"), 3),
            str(s.get("steps", "–")), fmt_f(r.record.get("wall_s", math.nan) / 60, 1),
            str(r.record.get("threads", "–")), fmt_g(s.get("median_tok_s"), 4), fmt_f(s.get("final_val_loss"), 3),
        ])  # fmt: skip
    return table(["run", "role", "optimizer", "lr", "wd", "decay schedule", "T/τ", "steps", "wall min", "threads",
                  "tok/s", "val loss"], rows)  # fmt: skip


def _share_table(runs: list[PackedStudyRun]) -> str:
    cells = {}
    for r in runs:
        for row in share_table(r.log, CLS, steps=SHARE_STEPS):
            cells[(r.name, row["paper_step"])] = fmt_shares(row["ours"])
    rows = []
    for step in SHARE_STEPS:
        pre = PAPER_BUDGET_PRE_UPDATE.get(step)
        rows.append([f"{100 * step / PAPER_TOTAL_STEPS:g}% ({step:,})", *(cells[(r.name, step)] for r in runs),
                     fmt_shares(pre or None)])  # fmt: skip
    return table(["fraction of training (paper step)", *(r.label for r in runs), "paper (pre-update W)"], rows)


def _lambda_table(runs: list[PackedStudyRun]) -> str:
    rows = []
    for r in runs:
        c = lambda_course(r.log)
        b = end_budget(r.log)
        if not c:
            rows.append([r.label, *["–"] * 7])
            continue
        rows.append([
            r.label, fmt_g(c["init"]), f"{fmt_g(c['peak'])} @ {c['peak_step']:,} ({100 * c['peak_fraction']:.0f}%)",
            f"{fmt_g(c['final'])} @ {c['final_step']:,}", fmt_f(100 * c["relaxation"], 1),
            f"{fmt_g(b['rms_peak'])} ({100 * b['rms_peak_fraction']:.0f}%)", fmt_f(100 * b["late_drift"], 1),
            f"{fmt_f(b['align'])} / {fmt_f(b['inject'])} / {fmt_f(b['decay'])}",
        ])  # fmt: skip
    return table(["run", "λ at step 0", "peak λ @ step (fraction)", "final λ", "below peak %",
                  "peak RMS (fraction)", "RMS drift, last 20% %", "end align / inject / decay %"], rows)  # fmt: skip


def _k_table(runs: list[PackedStudyRun]) -> str:
    rows = []
    for r in runs:
        if not r.log.weibull:
            continue
        last = r.log.weibull[-1]
        blocks = [b for b in last["blocks"] if b["cls"] == CLS]
        comps = sorted({b["component"] for b in blocks})
        per = []
        for comp in comps:
            ks = [b["k"] for b in sorted(blocks, key=lambda b: b["layer"] or 0) if b["component"] == comp]
            per.append(f"{comp}: " + ", ".join(fmt_f(k, 3) for k in ks))
        c = class_lambda(r.log)
        after = c["step"] >= 0.1 * r.log.total_steps
        band = f"{fmt_f(float(c['k_min'][after].min()), 3)}–{fmt_f(float(c['k_max'][after].max()), 3)}"
        rows.append([r.label, f"{last['step']:,}", "; ".join(per), band])
    return table(["run", "fit step", "k per block (layers 0…)", "k range over blocks, after 10% of training"], rows)


def _analysis_table(runs: list[PackedStudyRun]) -> tuple[str, list[str]]:
    spacings = sorted({int(s) for r in runs for s in r.analysis.get("spline", {}) if str(s).isdigit()})
    rows, skipped = [], []
    for r in runs:
        loop = r.analysis.get("closed_loop", {})
        exact = loop.get("initial_ratio/exact", {}).get("log_rmse")
        pub = loop.get("initial_ratio/published", {}).get("log_rmse")
        spline = r.analysis.get("spline", {})
        if "skipped" in spline:
            skipped.append(f"{r.label}: {spline['skipped']}")
        cells = []
        for s in spacings:
            m = spline.get(str(s), {})
            medians = [m.get(k, {}).get("median") for k in ("spline", "lr_time", "two_point")]
            cells.append("–" if "spline" not in m else " / ".join(fmt_f(v, 3) for v in medians))
        rows.append([r.label, fmt_f(exact, 4), fmt_f(pub, 4), *cells])
    header = ["run", "closed loop logRMSE (exact)", "(published bookkeeping)",
              *(f"S = {s}: spline / lr-time / two-point" for s in spacings)]  # fmt: skip
    return table(header, rows), skipped


def _figures(root: Path, names: list[str], docs_rel: str) -> str:
    figs = [f for f in names if (root / "figures" / f).is_file()]
    return " ".join(f"![{f}]({docs_rel}/figures/{f})" for f in figs)


def _target_verdicts(rise: list[PackedStudyRun], ttau: list[PackedStudyRun]) -> list[str]:
    """The study's targets (issue 17) for the rise-phase and the T/τ-matched runs, each met or missed."""
    verdicts = []
    if rise:
        vals = [rise_align(r.log) for r in rise]
        ok = all(v >= RISE_ALIGN_MIN for v in vals)
        verdicts.append(
            f"- Rise phase: mean Transmission align share over the first {RISE_FRACTION:.0%} of training "
            + ", ".join(f"{r.label} {fmt_f(v)}%" for r, v in zip(rise, vals, strict=True))
            + f" (seed spread {_spread(vals)} points; target ≥ {RISE_ALIGN_MIN:g}%: {met(ok)}; the papers' "
            f"rise-phase band {PAPER_RISE_ALIGN[0]}–{PAPER_RISE_ALIGN[1]}%)."
        )
    if ttau:
        for r in ttau:
            c, b = lambda_course(r.log), end_budget(r.log)
            if not c:
                verdicts.append(f"- {r.label}: no Weibull fits logged.")
                continue
            ok = c["peak_fraction"] < PEAK_BEFORE and c["relaxation"] >= RELAX_MIN and b["decay"] >= b["align"]
            verdicts.append(
                f"- T/τ-matched {r.label}: class-mean λ peaks at {100 * c['peak_fraction']:.0f}% of training "
                f"(target < {PEAK_BEFORE:.0%}) and ends {fmt_f(100 * c['relaxation'])}% below its peak (target ≥ "
                f"{RELAX_MIN:.0%}); at the end decay {fmt_f(b['decay'])}% vs align {fmt_f(b['align'])}% (target "
                f"decay ≥ align): {met(ok)}."
            )
        if len(ttau) > 1:
            courses = [lambda_course(r.log) for r in ttau]
            verdicts.append(
                f"- T/τ-matched seed spread: peak fraction {_spread([100 * c['peak_fraction'] for c in courses])} "
                f"points, relaxation {_spread([100 * c['relaxation'] for c in courses])} points."
            )
    return verdicts


def _analysis_lines(runs: list[PackedStudyRun], rise: list[PackedStudyRun], ttau: list[PackedStudyRun]) -> list[str]:
    """Closed loop and spline recovery: the table, what was not computed, and the spread across seeds."""
    out: list[str] = []
    analysis, skipped = _analysis_table(runs)
    out += [
        "**Closed loop and spline recovery** (`instrumented-adamw analyze`): logRMSE of λ predicted from ‖W‖²(0) and "
        "the integrated forces; median recovered / true alignment from checkpoints S steps apart.",
        "",
        analysis,
    ]
    if skipped:
        out += ["", "Spline recovery not computed: " + "; ".join(skipped)]
    closed = [r.analysis.get("closed_loop", {}).get("initial_ratio/exact", {}).get("log_rmse") for r in runs]
    closed = [v for v in closed if v is not None]
    if len(closed) > 1:
        out += ["", f"Closed-loop logRMSE across the runs: {fmt_f(min(closed), 4)}–{fmt_f(max(closed), 4)}."]
    for role, seeds in (("rise", rise), ("ttau", ttau)):
        if len(seeds) < 2:
            continue
        spread = []
        for s in sorted({int(k) for r in seeds for k in r.analysis.get("spline", {}) if str(k).isdigit()}):
            meds = [r.analysis["spline"].get(str(s), {}).get("spline", {}).get("median") for r in seeds]
            meds = [m for m in meds if m is not None]
            if meds:
                spread.append(f"S = {s}: {fmt_f(min(meds), 3)}–{fmt_f(max(meds), 3)}")
        if spread:
            out += ["", f"Spline recovery (step time) across the {role} seeds: " + "; ".join(spread) + "."]
    return out


def section_cpu_study(root: Path, docs_rel: str = "../results/cpu_study") -> str:
    runs = [r for r in load_study(root) if r.group == "adamw"]
    rise, ttau = _of(runs, "adamw", "rise"), _of(runs, "adamw", "ttau")
    if not runs:
        return f"*Pending:* no CPU-study run is committed under `results/cpu_study/`. Produced by {COMMAND}."
    first = runs[0].record
    cfg = first.get("config", {})
    m, d = cfg.get("model", {}), cfg.get("data", {})
    out = [
        f"GPT-NeoX, {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, vocabulary {m.get('vocab_size'):,} "
        f"(the study's BPE tokenizer on the offline English corpus), sequence {d.get('seq_len')} × batch "
        f"{d.get('batch_size')}, on {first.get('device', {}).get('name', 'CPU')}; configs in `configs/cpu_study/`, "
        f"command {COMMAND}. Runs of {cfg.get('schedule', {}).get('total_steps', '?'):,} steps are compared with "
        f"the papers' {PAPER_TOTAL_STEPS:,}-step runs at the same fraction of training.",
        "",
        _runs_table(runs),
        "",
        "**Transmission force budget** (align / inject / decay, % of |align| + inject + |decay|, pre-update W):",
        "",
        _share_table(runs),
        "",
    ]
    verdicts = _target_verdicts(rise, ttau)
    out += ["**Targets** (issue 17):", "", *verdicts, ""]
    out += [
        "**λ rise → peak → relax** (mean over the Transmission blocks of the per-block mid-80 λ; RMS of the class "
        "from the force log):",
        "",
        _lambda_table(runs),
        "",
        "**k per block** at the last fit (Transmission blocks: `o` attention output, `ffn_in` / `ffn_out` MLP in and "
        "out; the half-normal anchor is 1.2054):",
        "",
        _k_table(runs),
        "",
    ]
    out += _analysis_lines(runs, rise, ttau)
    figs = _figures(root, ["lambda.png", "align_share.png", "rms.png"], docs_rel)
    if figs:
        out += ["", figs]
    out += ["", "Per-run figures (forces, λ and k per block, closed loop, spline recovery): "
            + ", ".join(f"[{r.name}]({docs_rel}/{r.name}/figures/)" for r in runs) + "."]  # fmt: skip
    return "\n".join(out)


def section_muon_study(root: Path, docs_rel: str = "../results/cpu_study") -> str:
    runs = load_study(root)
    muon = [r for r in runs if r.group == "muon"]
    if not muon:
        return f"*Pending:* no hybrid Muon run is committed under `results/cpu_study/`. Produced by {COMMAND}."
    by_role = {}
    for r in runs:
        if r.seed == 1 or r.group == "muon":
            by_role.setdefault((r.group, r.role), r)
    out = [
        "Hybrid Muon + AdamW (`optim.name: muon`: `InstrumentedMuon` on the 16 hidden matrices, `InstrumentedAdamW` "
        "on embeddings, head, norms and biases; `adjust_lr_fn=match_rms_adamw`, so the AdamW runs' lr and wd carry "
        "over) against the AdamW runs of the same recipe (seed 1). The Transmission class is driven by Muon in the "
        "hybrid runs: align = −2η_u⟨W,O⟩, inject = η_u²‖O‖², decay = −2ηλ‖W‖² (η_u: Muon's shape-adjusted lr).",
        "",
    ]
    pairs = [r for key in (("adamw", "rise"), ("muon", "rise"), ("adamw", "ttau"), ("muon", "ttau"),
                           ("muon", "ttau_lr_squared")) if (r := by_role.get(key)) is not None]  # fmt: skip
    out += ["**Transmission force budget** at matched fractions of training:", "", _share_table(pairs), ""]
    rows = []
    for r in pairs:
        v = rise_align(r.log)
        rows.append([r.label, r.group, r.role, fmt_f(v)])
    out += [table(["run", "optimizer", "role", f"align % over the first {RISE_FRACTION:.0%}"], rows), ""]
    out += ["**λ, RMS and the end of training:**", "", _lambda_table(pairs), ""]
    out += ["**k per block** at the last fit:", "", _k_table(pairs), ""]
    lr, lr2 = by_role.get(("muon", "ttau")), by_role.get(("muon", "ttau_lr_squared"))
    if lr is not None and lr2 is not None:
        a, b = end_budget(lr.log), end_budget(lr2.log)
        ta, tb = _last_metric(lr.log, f"{CLS}/t_over_tau"), _last_metric(lr2.log, f"{CLS}/t_over_tau")
        out += [
            f"**lr vs lr² decay under Muon** (the corrected-decay paper's claim: with decay ∝ η² the norm settles "
            f"whatever the optimizer): over the last {1 - LATE_FRACTION:.0%} of training the Transmission RMS moves "
            f"{fmt_f(100 * a['late_drift'])}% with decay ∝ η (T/τ {fmt_g(ta, 3)}) and {fmt_f(100 * b['late_drift'])}% "
            f"with decay ∝ η² (T/τ {fmt_g(tb, 3)}); final RMS {fmt_g(a['rms_final'])} vs {fmt_g(b['rms_final'])}.",
            "",
        ]
    figs = _figures(root, ["muon_lambda.png", "muon_rms.png"], docs_rel)
    if figs:
        out += [figs]
    return "\n".join(out).strip()


# ---------------------------------------------------------------------------------------------- figures
def study_figures(root: Path) -> list[Path]:
    """The study's comparison figures in ``root/figures``: class-mean λ, align share and RMS against the fraction
    of training for every AdamW run, and λ and RMS for the Muon runs beside their AdamW controls."""
    from instrumented_adamw.analysis.plotting import colors, compact_png, plt, save_figure

    runs = load_study(root)
    if not runs:
        return []
    (root / "figures").mkdir(parents=True, exist_ok=True)
    pyplot = plt()
    written = []

    def draw(selection: list[PackedStudyRun], what: str, path: Path, title: str, ylabel: str) -> None:
        fig, ax = pyplot.subplots(figsize=(7.5, 4.2))
        for r, c in zip(selection, colors(len(selection)), strict=True):
            style = "--" if r.seed != 1 else "-"
            if what == "lambda":
                s = class_lambda(r.log)
                x, y = s["step"] / r.log.total_steps, s["lam"]
            else:
                f = force_series(r.log)
                x, y = f["fraction"], f["align_share" if what == "align" else "rms"]
            ax.plot(x, y, style, color=c, lw=1.6, label=f"{r.name} ({r.group}, {r.role})")
        if what == "align":
            ax.axhline(RISE_ALIGN_MIN, color="0.3", lw=0.8, ls=":", label=f"target {RISE_ALIGN_MIN:g}% (rise)")
            ax.axvline(RISE_FRACTION, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("fraction of training")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        save_figure(fig, path)
        compact_png(path)
        written.append(path)

    adamw = [r for r in runs if r.group == "adamw"]
    if adamw:
        draw(adamw, "lambda", root / "figures" / "lambda.png", "Transmission λ (mean over blocks), AdamW runs", "λ")
        draw(adamw, "align", root / "figures" / "align_share.png", "Transmission align share, AdamW runs",
             "align share of |align| + inject + |decay| (%)")  # fmt: skip
        draw(adamw, "rms", root / "figures" / "rms.png", "Transmission RMS, AdamW runs", "RMS(W)")
    muon = [r for r in runs if r.group == "muon"]
    if muon:
        both = muon + [r for r in adamw if r.seed == 1]
        draw(both, "lambda", root / "figures" / "muon_lambda.png", "Transmission λ: hybrid Muon vs AdamW", "λ")
        draw(both, "rms", root / "figures" / "muon_rms.png", "Transmission RMS: hybrid Muon vs AdamW", "RMS(W)")
    return written
