"""The CPU study's plumbing: the study file, packing a run into results/cpu_study, adopting a trial, and the
sections of docs/results.md built from packed runs (their measurements checked against the logs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import cpu_study as study
from experiments.results_doc import cpu_study_sections as S
from instrumented_adamw.analysis.runs import load_run
from train.config import load_config
from train.loop import train

TOTAL = 120
# A tiny run on generated data, standing in for a study run (the real ones take 20 minutes).
DEMO = ("configs/demo.yaml", [f"schedule.total_steps={TOTAL}", "schedule.warmup_steps=10", "logging.weibull_every=20",
                              "logging.eval_every=60", "checkpoint.every=20", "checkpoint.early=[]",
                              "checkpoint.resume_every=60", "logging.progress=false", "logging.report=false",
                              "data.synthetic_tokens=60000"])  # fmt: skip


def _run(name: str, seed: int, group: str, role: str, extra=()) -> study.StudyRun:
    return study.StudyRun(name, DEMO[0], seed, group, role, overrides=(*DEMO[1], *extra))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    results = tmp / "results"
    runs = [
        _run("demo_rise_s1", 1, "adamw", "rise"),
        _run("demo_ttau_s1", 1, "adamw", "ttau", ["optim.weight_decay=1.0"]),
        _run("demo_muon_s1", 1, "muon", "ttau", ["optim.name=muon"]),
    ]
    for r in runs:
        where = [f"run.out_dir={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}"]
        cfg = load_config(study.ROOT / r.config, [*r.overrides, f"run.seed={r.seed}", f"run.name={r.name}", *where])
        run_dir = train(cfg)
        study.pack(r, run_dir, wall_s=12.0, threads=1, results=results, spacings=[20, 40])
    return results, runs


def test_the_study_file_lists_every_run_with_its_seeds():
    runs = study.load_study()
    names = [r.name for r in runs]
    assert names == ["cpu_rise_s1", "cpu_rise_s2", "cpu_ttau_s1", "cpu_ttau_s2", "cpu_muon_rise_s1", "cpu_muon_ttau_s1",
                     "cpu_muon_ttau_lr_squared_s1"]  # fmt: skip
    for r in runs:
        cfg = study.resolved(r)
        assert cfg.run.seed == r.seed and cfg.run.name == r.name
        assert (cfg.optim.name == "muon") == (r.group == "muon")
        assert cfg.schedule.total_steps == 2000 and cfg.checkpoint.every == 50  # spline spacings 50..500
    lr2 = study.resolved(runs[-1])
    assert lr2.optim.weight_decay_schedule == "lr_squared"


def test_pack_writes_compact_logs_that_load_as_the_run(packed):
    results, runs = packed
    folder = results / "demo_rise_s1"
    record = json.loads((folder / "run.json").read_text())
    assert record["role"] == "rise" and record["group"] == "adamw" and record["wall_s"] == 12.0
    assert record["config_digest"] == study.config_digest(study.resolved(runs[0]))
    assert study.is_done(runs[0], results) and not study.is_done(_run("demo_rise_s1", 2, "adamw", "rise"), results)
    log = load_run(folder)
    assert log.metrics[-1]["step"] == TOTAL and log.weibull[-1]["step"] == TOTAL
    figures = {p.name for p in (folder / "figures").glob("*.png")}
    assert figures >= {f"{k}_demo_rise_s1.png" for k in ("forces", "lambda", "closed_loop")} | {"spline_recovery.png"}
    assert sorted(record["spline"]) == ["20", "40"]
    assert not list(results.glob("*.tmp"))


def test_study_measurements_match_the_logs(packed):
    results, _ = packed
    log = load_run(results / "demo_ttau_s1")
    fits = [(w["step"], [b["lam"] for b in w["blocks"] if b["cls"] == "Transmission"]) for w in log.weibull]
    course = S.lambda_course(log)
    means = [float(np.mean(lams)) for _, lams in fits]
    assert course["peak"] == max(means) and course["init"] == means[0] and course["final"] == means[-1]
    assert course["peak_step"] == fits[int(np.argmax(means))][0]
    assert math.isclose(course["relaxation"], 1 - means[-1] / max(means))
    forces = [r for r in log.forces if "Transmission" in r["classes"]]
    early = [100 * r["classes"]["Transmission"]["align_share"] for r in forces if r["step"] <= TOTAL / 4]
    assert math.isclose(S.rise_align(log), float(np.mean(early)))
    end = S.end_budget(log)
    assert math.isclose(end["decay"], 100 * forces[-1]["classes"]["Transmission"]["decay_share"])
    late = [r["classes"]["Transmission"]["rms"] for r in forces if r["step"] >= 0.8 * TOTAL]
    assert math.isclose(end["late_drift"], late[-1] / late[0] - 1)


def test_sections_render_targets_tables_and_figures(packed):
    results, _ = packed
    figures = S.study_figures(results)
    assert {f.name for f in figures} == {"lambda.png", "align_share.png", "rms.png", "muon_lambda.png", "muon_rms.png"}
    text = S.section_cpu_study(results)
    assert "`demo_rise_s1`" in text and "`demo_ttau_s1`" in text and "`demo_muon_s1`" not in text
    assert "Rise phase: mean Transmission align share over the first 25%" in text
    assert "T/τ-matched `demo_ttau_s1`: class-mean λ peaks at" in text
    assert "(results/cpu_study/figures/lambda.png)" in text or "figures/lambda.png" in text
    assert "S = 20: spline / lr-time / two-point" in text
    muon = S.section_muon_study(results)
    assert "`demo_muon_s1`" in muon and "`demo_rise_s1`" in muon


def test_adopt_packs_a_matching_trial_and_refuses_another(packed, tmp_path, monkeypatch, capsys):
    results, runs = packed
    monkeypatch.setattr(study, "RESULTS", tmp_path / "adopted")
    trained = results.parent / "runs" / "demo_ttau_s1"  # the trained run directory (not the packed folder)
    assert study.adopt(runs, "demo_rise_s1", str(trained)) == 2
    assert "optim.weight_decay" in capsys.readouterr().err
    assert study.adopt(runs, "demo_ttau_s1", str(trained)) == 0
    assert (tmp_path / "adopted" / "demo_ttau_s1" / "run.json").is_file()
