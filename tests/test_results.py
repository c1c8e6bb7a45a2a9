"""docs/results.md and the GPU block of docs/benchmarks.md are what the committed results/ give; every section
renders from real (dry-run) results and says what is pending without them; notes and benchmark tables render."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from experiments import results_doc as R
from experiments.results_doc.__main__ import main as cli

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = ROOT / "configs" / "campaign.yaml"
DRY = ROOT / "results" / "dry_run"


def test_the_docs_are_what_the_committed_results_give():
    diffs = R.generate(ROOT / "results", ROOT / "docs", CAMPAIGN, check=True)
    assert diffs == [], "run `make results` and commit docs/:\n" + "\n".join(diffs)


def test_the_committed_dry_run_is_labelled_and_not_evidence():
    assert (DRY / "windows").is_dir() and list(DRY.glob("runs/*/run.json")), "results/dry_run/ must hold a dry run"
    for record in DRY.glob("**/run.json"):
        assert json.loads(record.read_text())["dry_run"] is True
    for prov in DRY.glob("**/provenance.json"):
        assert json.loads(prov.read_text())["dry_run"] is True
    text = (ROOT / "docs" / "results.md").read_text()
    main = text.split("## Pipeline dry run")[0]
    assert "(CPU dry run)" not in main  # no dry-run number above its own section
    assert "**not evidence**" in text.split("## Pipeline dry run")[1]


def test_every_section_renders_from_results(tmp_path):
    res = R.load_results(DRY, CAMPAIGN, dry=False)  # the dry run's folders as if they were evidence
    text = R.render_results(res)
    for _, title, _ in R.SECTIONS:
        assert f"## {title}\n" in text
    done = sorted(res.runs)
    assert done, "the committed dry run has at least one run"
    run = res.runs[done[0]]
    shares = text.split("## Force budget shares")[1].split("\n## ")[0]
    row = next(line for line in shares.splitlines() if line.startswith("| 5,000 |"))
    assert re.search(r"\| \d+\.\d / \d+\.\d / \d+\.\d \|", row), row  # our shares, beside the paper's
    assert "88.7 / 4.3 / 7.0" in row and "87.7 / 4.7 / 7.6" in row
    assert f"{run.label}" in text and "(CPU dry run)" in text
    loop = run.analysis["closed_loop"]["initial_ratio/exact"]["log_rmse"]
    assert f"| {run.label} | {loop:.4f} |" in text
    if run.record.get("spline"):
        assert "spline (step time)" in text
    assert "*Pending:*" in text  # the runs the dry run did not reach


def test_without_results_every_section_says_what_is_pending_and_how(tmp_path):
    res = R.load_results(tmp_path, CAMPAIGN)
    text = R.render_results(res)
    for key, title, _ in R.SECTIONS:
        body = text.split(f"## {title}\n")[1].split("\n## ")[0]
        if key in ("cpu_study", "muon_study"):  # CPU studies: made here, by make study
            assert "*Pending:*" in body and "make study" in body, (key, body)
        elif key not in ("status", "dry_run"):
            assert "*Pending:*" in body and "make gpu-evidence" in body, (key, body)
    assert "0 of 13 runs committed" in text
    block = R.render_benchmarks(res)
    assert block.startswith(R.BENCH_BEGIN) and "No GPU benchmark is committed yet" in block


def test_notes_appear_under_their_section(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(DRY, root)
    (root / "notes").mkdir()
    (root / "notes" / "closed_loop.md").write_text("We disagree with the paper here because of the bookkeeping.")
    text = R.render_results(R.load_results(root, CAMPAIGN))
    section = text.split("## Closed loop")[1].split("\n## ")[0]
    assert section.rstrip().endswith("We disagree with the paper here because of the bookkeeping.")


def test_gpu_benchmark_block_renders_the_committed_json(tmp_path):
    root = tmp_path / "results"
    (prov,) = DRY.glob("bench/train_step/*/provenance.json")
    dest = root / "bench" / "train_step" / "nvidia-h100-80gb-hbm3-0123456789ab"
    dest.mkdir(parents=True)
    record = json.loads(prov.read_text())
    record.update(dry_run=False, device=dict(record["device"], name="NVIDIA H100 80GB HBM3"))
    (dest / "provenance.json").write_text(json.dumps(record))
    result = json.loads((prov.parent / "result.json").read_text())
    result["env"]["device_name"] = "NVIDIA H100 80GB HBM3"
    (dest / "result.json").write_text(json.dumps(result))
    block = R.render_benchmarks(R.load_results(root))
    assert "### `train_step` on NVIDIA H100 80GB HBM3" in block
    assert "| variant | tok_s | ms_per_step | first_step_s |" in block
    assert "compiled bf16 training: InstrumentedAdamW / torch fused tok/s" in block
    page = "# Benchmarks\n\nkept\n\n" + R.BENCH_BEGIN + "\nold\n" + R.BENCH_END + "\n\nkept too\n"
    new = R.replace_block(page, block)
    assert new.startswith("# Benchmarks\n\nkept\n\n") and new.endswith("\n\nkept too\n") and "old" not in new
    with pytest.raises(ValueError, match="no generated block"):
        R.replace_block("# Benchmarks\n", block)


def test_results_command_checks_and_regenerates(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs / "benchmarks.md")
    (docs / "results.md").write_text("stale\n")
    args = ["--results", str(ROOT / "results"), "--docs", str(docs), "--campaign", str(CAMPAIGN)]
    assert cli([*args, "--check"]) == 1
    assert "docs differ" in capsys.readouterr().err and (docs / "results.md").read_text() == "stale\n"
    assert cli(args) == 0
    assert cli([*args, "--check"]) == 0
    assert (docs / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text()


def test_results_stay_small_enough_to_travel():
    """results/ travels to every GPU window with the tree and the carried token files (64 MiB in all, ~20 MiB of
    tokens): it must stay well under the rest. A run's compact logs are about 3 MB; twelve runs fit."""
    size = sum(f.stat().st_size for f in (ROOT / "results").rglob("*") if f.is_file() and "figures" not in f.parts)
    assert size <= 40 * 2**20, f"results/ holds {size / 2**20:.1f} MiB: see docs/gpu_evidence.md (sizes)"


def test_a_failed_check_is_one_list_line_with_its_kernel_source(tmp_path):
    """pytest messages span lines; each failure must stay one Markdown list item, cut to a readable length."""
    folder = tmp_path / "checks" / "dev-abc"
    folder.mkdir(parents=True)
    provenance = {"date": "2026-11-27T05:06:56+00:00", "commit": {"sha": "0" * 40}, "device": {"name": "GPU X"}}
    provenance.update(source_hash="abcdef0123456789", status="failed", wall_s=3.0)
    message = "AssertionError: Tensor-likes are not close!\n\nMismatched elements: 1 / 4\n" + "x" * 400
    checks = {"summary": {"passed": 1, "failed": 1, "skipped": 0}, "tests": []}
    checks["tests"] = [{"test": "t::a", "outcome": "passed", "message": ""}, {"test": "t::b", "outcome": "failed"}]
    checks["tests"][1]["message"] = message
    (folder / "provenance.json").write_text(json.dumps(provenance))
    (folder / "checks.json").write_text(json.dumps(checks))
    text = R.section_checks(R.load_results(tmp_path, CAMPAIGN))
    items = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(items) == 1, text
    assert (
        "kernel source `abcdef012345`: `t::b` failed: AssertionError: Tensor-likes are not close! Mismatched"
        in items[0]
    )
    assert items[0].endswith("…") and len(items[0].split(" failed: ", 1)[1]) == 240
    assert "| GPU X | 2026-11-27 | `0000000000` | `abcdef012345` | 1 | 1 | 0 | 3 | failed |" in text
