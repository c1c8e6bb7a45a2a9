"""Dashboards as a user opens them: a 60-step plain loop with ForceMonitor(sinks=[JSONL, WandbSink offline,
TensorBoardSink]) (tools/dashboard_shot.py): the derived metrics and diagnostics reach wandb under forces/<class>/
(at most 300 keys a log) with its alerts, TensorBoard gets its custom-scalars layout and the alerts as text, and
TensorBoard itself, served and opened in headless Chromium, shows the dashboard."""

from __future__ import annotations

import json
import os
import urllib.request

import numpy as np
import pytest
from wandb_reader import history, records, run_file

from instrumented_adamw.sinks import TENSORBOARD_LAYOUT, read_jsonl
from tools.dashboard_shot import STEPS, chromium, plain_loop, screenshot, tensorboard

DERIVED = ("update_norm", "weight_norm", "update_weight_ratio", "cos_w_u", "tau_iter", "t_over_tau", "t_over_tau_end",
           "tau_frac", "rms_eq", "rms_over_eq", "align_share", "inject_share", "decay_share")  # fmt: skip
MAX_KEYS = 300  # per wandb log, for a small GPT-NeoX (docs/monitor.md)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dashboards")
    with pytest.warns(UserWarning, match="T/τ at the end of the schedule is projected"):
        return plain_loop(out)


def test_wandb_gets_the_derived_metrics_sectioned_and_bounded(run):
    every = history(run_file(run["wandb"]))
    rows = [r for r in every if "loss" in r]
    assert [r["trainer/step"] for r in rows] == list(range(5, STEPS + 1, 5)), [sorted(r)[:8] for r in every]
    classes = ("Transmission", "QKV", "Other")
    for row in rows:
        for cls in classes:
            for key in DERIVED:
                assert f"forces/{cls}/{key}" in row, (cls, key)
        assert not [k for k in row if k.split("/")[0] in classes], "class metrics only under forces/"
    widest = max(len(r) for r in history(run_file(run["wandb"])))
    assert widest <= MAX_KEYS, widest
    jsonl = read_jsonl(run["jsonl"] / "metrics.jsonl")
    assert rows[-1]["forces/Transmission/t_over_tau_end"] == jsonl[-1]["Transmission/t_over_tau_end"]


def test_alerts_once_in_wandb_and_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raised = [a for r in read_jsonl(run["jsonl"] / "metrics.jsonl") for a in r.get("alerts", [])]
    assert raised and len({(a["class"], a["kind"]) for a in raised}) == len(raised), "each once"
    assert {a["kind"] for a in raised} >= {"decay_cannot_balance"}  # λ = 0.1 over 60 steps: T/τ ≈ 0.02
    alerts = [r.alert for r in records(run_file(run["wandb"])) if r.WhichOneof("record_type") == "alert"]
    assert sorted(a.text for a in alerts) == sorted(a["message"] for a in raised)
    acc = EventAccumulator(str(run["tensorboard"]), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("alerts/")]
    assert len(texts) == len({a["class"] for a in raised})
    assert acc.Scalars("Transmission/t_over_tau_end")[-1].step == STEPS


def test_tensorboard_dashboard_in_a_real_browser(run, tmp_path):
    """TensorBoard serves the sink's custom-scalars layout; headless Chromium renders the tab with its charts drawn
    (the lines' colour below the header; a page without data has none)."""
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for the browser check (.ci/run installs it)")
        pytest.skip("no Chromium on PATH (apt-get install chromium) for the browser check")
    from PIL import Image

    with tensorboard(run["tensorboard"]) as url:
        with urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout", timeout=30) as r:
            layout = json.loads(r.read())
        assert [c["title"] for c in layout["category"]] == list(TENSORBOARD_LAYOUT)
        png = screenshot(f"{url}/?darkMode=false#custom_scalars", tmp_path / "shot.png")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1900, 1400)
    charts = pixels[150:]  # below TensorBoard's (orange) header
    line = np.array([255, 112, 67])  # the first run's colour (#ff7043)
    drawn = (np.abs(charts - line).sum(axis=2) < 60).sum()
    assert drawn > 5000, drawn  # observed: 17k with the run, 0.3k for the layout without data


def test_wandb_sections_only_the_class_metrics():
    from instrumented_adamw.sinks import wandb_key

    assert wandb_key("Transmission/rms") == "forces/Transmission/rms"
    assert wandb_key("Other/t_over_tau_end") == "forces/Other/t_over_tau_end"
    for kept in ("loss", "lr", "val/acc", "train/loss", "weibull/QKV/k_median", "l2_norm/update/w", "trainer/step"):
        assert wandb_key(kept) == kept
