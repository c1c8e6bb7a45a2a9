"""The GPU evidence command without a GPU: the dry run end to end (bundle within the device tool's limits, manifest,
unpack, docs regenerated from it), budget skips with their reasons, campaign bookkeeping, bundle packing and
unpacking safety, compact logs, token carrying and ``prepare``."""

from __future__ import annotations

import contextlib
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments import bundle
from experiments.campaign import (
    NAME,
    CampaignError,
    config_digest,
    load_campaign,
    resolve,
    run_states,
)
from experiments.compact_logs import compact_jsonl
from experiments.gpu_evidence.window import EvidenceLog, ensure_tokens
from experiments.results_doc import generate
from instrumented_adamw.analysis.runs import load_run

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = ROOT / "configs" / "campaign.yaml"
LIMITS = bundle.Limits()
#: The campaign's runs (configs/campaign.yaml), in priority order.
N_RUNS = len(yaml.safe_load((ROOT / "configs" / "campaign.yaml").read_text())["runs"]["list"])


def evidence(*args: str, tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "experiments.gpu_evidence", "--results", str(tmp / "results"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_bundle(out: Path) -> dict:
    """The device tool's limits, and every archive as the manifest describes it."""
    files = sorted(out.iterdir())
    assert 2 <= len(files) <= LIMITS.max_files
    assert all(f.is_file() and NAME.fullmatch(f.name) for f in files)
    assert all(f.stat().st_size <= LIMITS.max_file_bytes for f in files)
    assert sum(f.stat().st_size for f in files) <= LIMITS.max_total_bytes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and (out / "evidence.log").is_file()
    assert sorted(f.name for f in files) == sorted(["manifest.json", "evidence.log", *manifest["files"]])
    for name, meta in manifest["files"].items():
        assert bundle.sha256(out / name) == meta["sha256"] and (out / name).stat().st_size == meta["bytes"]
        with tarfile.open(out / name) as tar:
            folders = {"/".join(m.name.split("/")[: 3 if m.name.startswith("bench/") else 2]) for m in tar}
        assert folders == set(meta["folders"])
    return manifest


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of the whole command (checks, smoke benchmarks, one campaign run at demo size), unpacked."""
    tmp = tmp_path_factory.mktemp("dry")
    proc = evidence("run", "--out", str(tmp / "out"), "--budget", "240", "--max-runs", "1", "--work",
                    str(tmp / "work"), tmp=tmp)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = check_bundle(tmp / "out")
    unpacked = evidence("unpack", str(tmp / "out"), tmp=tmp)
    assert unpacked.returncode == 0, unpacked.stderr
    return dict(tmp=tmp, proc=proc, manifest=manifest, unpacked=unpacked)


def test_the_dry_run_says_so_and_runs_every_piece(dry):
    out, manifest = dry["proc"].stdout, dry["manifest"]
    assert out.splitlines()[0].split("] ", 1)[1].startswith("DRY RUN: no CUDA device")
    assert manifest["dry_run"] is True and manifest["device"]["kind"] == "cpu"
    status = {(p["part"], p["name"]): p for p in manifest["pieces"]}
    checks = status[("checks", "test_cuda")]
    assert checks["status"] == "done" and "skipped" in checks["reason"]  # CUDA tests skip without CUDA, and run
    for name in ("optimizer_step", "train_step", "weibull_fits", "monitor_overhead"):
        assert status[("bench", name)]["status"] == "done", status[("bench", name)]
    assert status[("runs", "pythia70m_s1")]["status"] == "done"
    later = [p for p in manifest["pieces"] if p["part"] == "runs" and p["name"] != "pythia70m_s1"]
    assert len(later) == N_RUNS - 1 and all(
        p["status"] == "not started" and "--max-runs 1" in p["reason"] for p in later
    )
    assert manifest["wall_s"] <= 240
    model = manifest["calibration"]["model"]
    assert model["startup_s"]["source"] == "this window"  # what the run measured feeds the next predictions


def test_the_unpacked_dry_run_is_complete_and_regenerates_the_docs(dry, tmp_path):
    results = dry["tmp"] / "results" / "dry_run"
    assert "dry run (not evidence)" in dry["unpacked"].stdout
    run_dir = results / "runs" / "pythia70m_s1"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "done" and record["dry_run"] and record["reproduce"].startswith("python -m train ")
    for key in ("commit", "device", "env", "config", "config_digest", "timing", "summary"):
        assert record[key], key
    assert record["timing"]["scheduler"]["startup_s"] > 0 and record["timing"]["worker"]["analysis_s"] > 0
    assert not (run_dir / "figures").exists() or not any(  # figures come back but are not results
        p for p in (run_dir / "figures").iterdir() if p.suffix != ".png"
    )
    run = load_run(run_dir)  # compact logs read like plain ones
    assert [m["step"] for m in run.metrics] == list(range(10, 81, 10))
    assert [r["step"] for r in run.forces if "tensors" in r] == [20, 40, 60, 80]  # per-tensor every 20 (dry)
    assert [r["step"] for r in run.weibull] == [0, 20, 40, 60, 80]
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert set(analysis["spline"]) == {"20", "40"}  # the spline run validated at the dry run's spacings
    assert math.isfinite(analysis["closed_loop"]["initial_ratio/exact"]["log_rmse"])
    for sub in ("checks", "bench/optimizer_step", "bench/train_step", "bench/weibull_fits", "bench/monitor_overhead"):
        (prov,) = results.glob(f"{sub}/*/provenance.json")
        p = json.loads(prov.read_text())
        assert p["dry_run"] and p["commit"]["sha"] and p["device"]["versions"]["torch"] and p["source_hash"]
    bench = json.loads(next(results.glob("bench/train_step/*/result.json")).read_text())
    assert bench["smoke"] and bench["env"]["device_name"] and bench["env"]["torch"] and bench["targets"]
    assert (results / "windows" / f"{dry['manifest']['window']}.json").is_file()
    # the docs regenerate from it: the run's numbers appear, the rest is pending
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs / "benchmarks.md")
    assert generate(results, docs, CAMPAIGN)  # written (it differs from nothing)
    text = (docs / "results.md").read_text()
    assert "| 5,000 | " in text and "`pythia70m_s1` (CPU dry run)" in text
    assert "*Pending:* the learning rate sweep" in text
    assert generate(results, docs, CAMPAIGN, check=True) == []


def test_committed_pieces_are_skipped_and_a_short_budget_skips_with_reasons(dry):
    tmp = dry["tmp"]
    again = evidence("run", "--out", str(tmp / "again"), "--budget", "60", "--max-runs", "0", tmp=tmp)
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = check_bundle(tmp / "again")
    status = {p["name"]: p for p in manifest["pieces"]}
    assert status["test_cuda"]["status"] == "skipped" and "already in results/" in status["test_cuda"]["reason"]
    assert all(status[n]["status"] == "skipped" for n in ("optimizer_step", "train_step", "weibull_fits"))
    assert status["pythia70m_s1"]["status"] == "skipped" and "already in results/" in status["pythia70m_s1"]["reason"]
    assert manifest["files"] == {}  # nothing new: a manifest and a log
    # 3.5 s with 3 s kept for packing: less than any piece has ever taken here (their measured times are the
    # estimates now), so everything is skipped, each with its reason, and the bundle is still written.
    short = evidence("run", "--out", str(tmp / "short"), "--budget", "3.5", "--redo", "checks,bench", tmp=tmp)
    manifest = check_bundle(tmp / "short")
    assert short.returncode == 0, short.stderr[-2000:]
    for p in manifest["pieces"]:
        if p["part"] in ("checks", "bench"):
            assert p["status"] == "skipped" and "s left" in p["reason"], p
        elif p["name"] != "pythia70m_s1":
            assert p["status"] == "not started" and "predicted" in p["reason"] and "s left" in p["reason"], p


def test_unpack_skips_identical_folders_and_refuses_to_change_committed_ones(dry, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(dry["tmp"] / "out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["dry_run"] = False  # as if from a GPU: unpacks into results/ itself and never replaces silently
    (out / "manifest.json").write_text(json.dumps(manifest))
    results = tmp_path / "results"
    first = bundle.unpack([out], results)
    assert "runs/pythia70m_s1" in first["added"] and not first["replaced"]
    second = bundle.unpack([out], results)
    assert not second["added"] and "runs/pythia70m_s1" in second["unchanged"]
    (results / "runs" / "pythia70m_s1" / "config.yaml").write_text("changed")
    with pytest.raises(bundle.BundleError, match="already in results/ with other content"):
        bundle.unpack([out], results)
    assert "runs/pythia70m_s1" in bundle.unpack([out], results, force=True)["replaced"]
    name = next(iter(manifest["files"]))
    with (out / name).open("r+b") as fh:  # damaged in transfer
        fh.seek(100)
        fh.write(b"\0" * 8)
    with pytest.raises(bundle.BundleError, match="SHA-256"):
        bundle.unpack([out], results)
    (out / name).unlink()
    with pytest.raises(bundle.BundleError, match="missing"):
        bundle.unpack([out], results)
    with pytest.raises(bundle.BundleError, match="no manifest.json"):
        bundle.unpack([tmp_path / "nowhere"], results)


def test_unpack_refuses_entries_outside_the_result_folders(tmp_path):
    evil = tmp_path / "b"
    evil.mkdir()
    payload = tmp_path / "x"
    payload.write_text("x")
    with tarfile.open(evil / "results-01.tar.gz", "w:gz") as tar:
        tar.add(payload, arcname="runs/../../escape.txt")
    meta = dict(bytes=(evil / "results-01.tar.gz").stat().st_size, sha256=bundle.sha256(evil / "results-01.tar.gz"))
    (evil / "manifest.json").write_text(json.dumps(dict(format=1, window="w", files={"results-01.tar.gz": meta})))
    with pytest.raises(bundle.BundleError, match="unexpected entry"):
        bundle.unpack([evil], tmp_path / "results")
    assert not (tmp_path / "escape.txt").exists()


def _folder(base: Path, rel: str, sizes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, size in sizes.items():
        f = base / rel / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())  # incompressible, like xz logs


def test_pack_keeps_whole_folders_within_the_limits_and_says_what_it_dropped(tmp_path):
    kib = 1024
    limits = bundle.Limits(max_files=4, max_file_bytes=300 * kib, max_total_bytes=1100 * kib, log_bytes=10 * kib)
    staging = tmp_path / "staging"
    _folder(staging, "checks/dev-abc", {"checks.json": 2 * kib})
    _folder(staging, "bench/train_step/dev-abc", {"result.json": 3 * kib})
    _folder(staging, "runs/big", {"forces.jsonl.xz": 200 * kib, "figures/a.png": 150 * kib}, 1)  # drops figures
    _folder(staging, "runs/a", {"forces.jsonl.xz": 60 * kib}, 2)  # fits beside checks, bench and big
    _folder(staging, "runs/b", {"forces.jsonl.xz": 250 * kib}, 3)
    _folder(staging, "runs/huge", {"forces.jsonl.xz": 400 * kib}, 4)  # alone over one file's limit
    _folder(staging, "runs/c", {"forces.jsonl.xz": 250 * kib}, 5)  # no slot left: 2 files are manifest and log
    (staging / "order.json").write_text(json.dumps(["runs/big", "runs/a", "runs/b", "runs/huge", "runs/c"]))
    out = tmp_path / "out"
    manifest = bundle.pack(staging, out, dict(format=1, window="w"), "log line\n" * 5000, limits)
    files = sorted(out.iterdir())
    assert len(files) <= limits.max_files and all(f.stat().st_size <= limits.max_file_bytes for f in files)
    assert sum(f.stat().st_size for f in files) <= limits.max_total_bytes
    packed = [f for meta in manifest["files"].values() for f in meta["folders"]]
    assert packed[:2] == ["checks/dev-abc", "bench/train_step/dev-abc"]  # checks and benchmarks first
    dropped = {(d["folder"], d["what"]) for d in manifest["dropped"]}
    assert ("runs/big", "figures") in dropped and ("runs/huge", "folder") in dropped
    assert ("runs/c", "folder") in dropped and "runs/big" in packed and "runs/a" in packed and "runs/b" in packed
    assert (out / "evidence.log").stat().st_size <= limits.log_bytes
    with pytest.raises(FileExistsError, match="not empty"):
        bundle.pack(staging, out, {}, "", limits)


def test_compact_logs_keep_nine_significant_digits(tmp_path):
    src = tmp_path / "forces.jsonl"
    records = [dict(step=10, time=1732650000.1234567, classes={"T": dict(align=1.234567890123e-5, residual=None,
                    steps=10, share=0.1 + 0.2)})]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    size = compact_jsonl(src, tmp_path / "forces.jsonl.xz")
    (back,) = [json.loads(line) for line in lzma.decompress((tmp_path / "forces.jsonl.xz").read_bytes()).splitlines()]
    assert size == (tmp_path / "forces.jsonl.xz").stat().st_size
    assert back["time"] == 1732650000.123 and back["step"] == 10
    c = back["classes"]["T"]
    assert c == dict(align=1.23456789e-5, residual=None, steps=10, share=0.3)
    assert abs(c["align"] / records[0]["classes"]["T"]["align"] - 1) < 5e-10


def test_campaign_bookkeeping_and_validation(tmp_path):
    c = load_campaign(CAMPAIGN, ROOT)
    names = [r.name for r in c.runs]
    assert names[:4] == [f"pythia70m_s{i}" for i in (1, 2, 3, 4)]  # the priority order
    assert names[4:7] == ["pythia70m_lr3e-4_s1", "pythia70m_lr3e-3_s1", "llama70m_s1"]
    assert [r.group for r in c.runs[7:]] == ["wd"] * 3 + ["lr_squared"] * 2 + ["muon"]
    gpu, dry = resolve(c, c.runs[0], False), resolve(c, c.runs[0], True)
    assert gpu.data.source == "tokens" and gpu.model.compile and gpu.optim.fused and gpu.logging.per_tensor_every == 250
    assert gpu.checkpoint.every == 250 and gpu.checkpoint.resume_every == 20000  # a spline run
    assert resolve(c, c.runs[1], False).checkpoint.every == 20000  # not a spline run: no snapshots between
    assert dry.model.hidden_size == 64 and dry.data.source == "synthetic" and dry.schedule.total_steps == 80
    lr2 = resolve(c, c.run("pythia70m_lr_squared_matched_s1"), True)
    assert lr2.optim.weight_decay_schedule == "lr_squared" and lr2.optim.weight_decay == 0.013633  # kept at demo size
    assert resolve(c, c.run("llama70m_s1"), True).model.arch == "llama"
    # the digest follows what a run computes, not how it logs or where it ran
    other_logging = resolve(c, c.runs[0], False, ("logging.log_every=50", "run.out_dir=/elsewhere"))
    assert config_digest(other_logging) == config_digest(gpu) != config_digest(resolve(c, c.runs[1], False))
    # done / pending / stale
    results = tmp_path / "results"
    record = dict(config=json.loads(json.dumps(gpu.to_dict(), default=list)), config_digest=config_digest(gpu),
                  device=dict(name="NVIDIA H100 80GB HBM3"), window="w1")  # fmt: skip
    (results / "runs" / "pythia70m_s1").mkdir(parents=True)
    (results / "runs" / "pythia70m_s1" / "run.json").write_text(json.dumps(record))
    stale = dict(record, config_digest="0" * 64)
    stale["config"]["optim"]["lr"] = 0.002
    (results / "runs" / "pythia70m_s2").mkdir(parents=True)
    (results / "runs" / "pythia70m_s2" / "run.json").write_text(json.dumps(stale))
    states = {s.name: s for s in run_states(c, results, dry_run=False)}
    assert states["pythia70m_s1"].state == "done" and "H100" in states["pythia70m_s1"].detail
    assert states["pythia70m_s2"].state == "stale" and "optim.lr: 0.002 -> 0.001" in states["pythia70m_s2"].detail
    assert states["pythia70m_s3"].state == "pending"
    # a campaign that would fail on the GPU fails here, naming the run
    bad = tmp_path / "campaign.yaml"
    bad.write_text(CAMPAIGN.read_text().replace("overrides: [optim.lr=3.0e-3, run.seed=1]",
                                                "overrides: [optim.lr=-3, run.seed=1]"))  # fmt: skip
    with pytest.raises(CampaignError, match=r"run pythia70m_lr3e-3_s1: optim.lr must be > 0"):
        load_campaign(bad, ROOT)
    bad.write_text(CAMPAIGN.read_text().replace('"@kernel", tests/test_cuda.py', '"@kernels", tests/test_cuda.py'))
    with pytest.raises(CampaignError, match="unknown source set '@kernels'"):
        load_campaign(bad, ROOT)


def test_carried_tokens_are_unpacked_and_checked(tmp_path):
    carry, tokens = tmp_path / ".gpu" / "evidence", tmp_path / ".gpu" / "tokens"
    carry.mkdir(parents=True)
    train = np.arange(1000, dtype=np.uint16)
    (carry / "train.bin.xz").write_bytes(lzma.compress(train.tobytes()))
    (carry / "valid.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    (carry / "tokens.json").write_text(json.dumps(dict(train_tokens=1000, valid_tokens=10)))
    ensure_tokens(tmp_path, EvidenceLog())
    assert np.array_equal(np.fromfile(tokens / "train.bin", dtype=np.uint16), train)
    assert (tokens / "valid.bin").is_file() and (tokens / "tokens.json").is_file()
    (tokens / "train.bin").unlink()
    (carry / "tokens.json").write_text(json.dumps(dict(train_tokens=999)))
    with pytest.raises(RuntimeError, match="damaged"):
        ensure_tokens(tmp_path, EvidenceLog())
    assert not (tokens / "train.bin").exists()


def test_prepare_packs_the_tokens_records_the_commit_and_checks_the_travel_size(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", repo / "configs")
    tokens = repo / ".gpu" / "tokens"
    tokens.mkdir(parents=True)
    np.arange(5000, dtype=np.uint16).tofile(tokens / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tokens / "valid.bin")
    (tokens / "tokens.json").write_text(json.dumps(dict(train_tokens=5000, valid_tokens=50)))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "configs"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_evidence", "prepare"], cwd=repo, env=env,
                          capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    carry = repo / ".gpu" / "evidence"
    assert np.array_equal(np.frombuffer(lzma.decompress((carry / "train.bin.xz").read_bytes()), np.uint16),
                          np.arange(5000, dtype=np.uint16))  # fmt: skip
    commit = json.loads((carry / "commit.json").read_text())
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert commit["sha"] == sha and commit["dirty"] == []
    assert "MiB of the 64 MiB that may travel" in proc.stdout
    assert '"carry": [\n  ".gpu/evidence"\n ]' in proc.stdout and "experiments.gpu_evidence run --out" in proc.stdout


def test_make_target_is_the_documented_command():
    # Run as a recipe of `make test`, make inherits MAKELEVEL and would print "Entering directory" first.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-evidence", "OUT=/tmp/x", "BUDGET_S=300"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env).stdout  # fmt: skip
    assert '-m experiments.gpu_evidence run --out "/tmp/x" --budget 300 --parts checks,bench,runs' in out
    assert out.startswith("PYTHONPATH=. ")


def test_the_gpu_path_imports_nothing_the_gpu_machine_lacks():
    """The GPU machine has torch, Triton, transformers, matplotlib, scipy, pyyaml, safetensors, tqdm and pytest, but
    not wandb, datasets, npm-weibull-py or expecttest (.library/device/KINDS.md): every module the evidence command
    and its workers import must load without them."""
    script = """
import importlib.abc, sys
MISSING = {"wandb", "datasets", "npm_weibull", "expecttest"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, Block())
import experiments.gpu_evidence.cli, train.loop, train.data, train.models, train.checkpoint, train.pretokenize
import instrumented_adamw.analysis.analyze, instrumented_adamw.analysis.report, instrumented_adamw.cli
import experiments.results_doc
from experiments.campaign import load_campaign
load_campaign("configs/campaign.yaml")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_kill_from_outside_stops_the_runs_and_still_leaves_a_bundle(tmp_path):
    import signal
    import time

    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "experiments.gpu_evidence", "--results", str(tmp_path / "results"), "run",
           "--out", str(out),
           "--budget", "300", "--parts", "runs", "--max-runs", "1", "--work", str(work)]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (work / "logs" / "pythia70m_s1.log").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "manifest.json").is_file()  # written before any piece: even an immediate kill leaves a bundle
    driver.send_signal(signal.SIGTERM)
    output, _ = driver.communicate(timeout=60)
    manifest = check_bundle(out)
    (run,) = [p for p in manifest["pieces"] if p["name"] == "pythia70m_s1"]
    assert run["status"] == "stopped" and "interrupted" in run["reason"], output[-2000:]
    assert "interrupted" in (out / "evidence.log").read_text()
    time.sleep(1)
    orphans = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(work) in cmdline.read_bytes().decode(errors="replace"):
                orphans.append(cmdline.parent.name)
    assert not orphans, f"worker processes outlived the command: {orphans}"


def test_runs_wait_for_a_kernel_that_fails_its_checks(tmp_path):
    from experiments.campaign import piece_folder, source_hash
    from experiments.gpu_evidence.window import detect_device

    c = load_campaign(CAMPAIGN, ROOT)
    device = detect_device(force_dry=True)
    folder = (
        tmp_path / "results" / "dry_run" / piece_folder("checks", device["slug"], source_hash(ROOT, c.checks_sources))
    )
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text(json.dumps(dict(status="failed", date="2026-01-01T00:00:00+00:00",
                                                            wall_s=1.0)))  # fmt: skip
    proc = evidence("run", "--out", str(tmp_path / "out"), "--budget", "60", "--parts", "runs", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [p for p in check_bundle(tmp_path / "out")["pieces"] if p["part"] == "runs"]
    assert len(runs) == N_RUNS and all(
        p["status"] == "not started" and "kernel checks failed" in p["reason"] for p in runs
    )


def test_a_dry_run_bundle_replaces_the_same_pieces_and_keeps_the_others(dry, tmp_path):
    results = tmp_path / "results"
    (checks,) = [f for f in dry["manifest"]["files"].values()][0]["folders"][:1]
    device = checks.split("/")[1].rsplit("-", 1)[0]
    older = results / "dry_run" / "checks" / f"{device}-000000000000"  # the same checks, older code
    other = results / "dry_run" / "runs" / "pythia70m_s2"  # a run the earlier dry run did
    old_window = results / "dry_run" / "windows" / "20000101T000000Z-old.json"
    for d in (older, other):
        d.mkdir(parents=True)
        (d / "provenance.json").write_text("{}")
    old_window.parent.mkdir(parents=True)
    old_window.write_text("{}")
    report = bundle.unpack([dry["tmp"] / "out"], results)
    assert report["dry_run"] and "runs/pythia70m_s1" in report["added"]
    assert not older.exists() and other.is_dir() and not old_window.exists()
    assert (results / "dry_run" / checks / "checks.json").is_file()
    assert [p.name for p in (results / "dry_run" / "windows").iterdir()] == [f"{dry['manifest']['window']}.json"]
