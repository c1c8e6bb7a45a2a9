"""Fault injection: kills at chosen points of the loop and of every save, damaged files, careless reruns, NaN.

Each case asserts one exact outcome: the rerun equals an uninterrupted run bitwise (final weights, and every log
record except wall-clock fields), or it fell back with a message naming what it skipped, or it refused with a
message and left the directory as it was — and never is a log record lost or duplicated. A tiny model (d 32,
40 steps) keeps the file fast; killed runs are processes forked from a server that has torch and transformers
imported already, so a kill costs a fraction of a second instead of an interpreter start.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.sinks import KINDS, JsonlSink, read_jsonl
from instrumented_adamw.utils.durable_io import check_prefix, file_mark, verify_manifest
from train import checkpoint as ckpt
from train import failpoints as faults
from train.config import load_config
from train.loop import NonFiniteError, summary_line, train
from train.rundir import ConfigChangedError, RunDirError, RunLockedError, run_lock

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TOTAL = 40
WALL_CLOCK = ("time", "throughput(tok/s)")
SNAPSHOT_STEPS = (0, 1, 2, 10, 20, 30, 40)
RESUME_STEPS = (0, 10, 20, 30, 40)


def overrides(tmp: Path, name: str, *extra: str) -> list[str]:
    # 4 seqs * 32 tokens = 128 tokens/step; resume states every 10 steps, snapshots at 0, 1, 2 and every 10.
    return [f"run.out_dir={tmp}", f"run.name={name}", f"data.cache_dir={tmp.parent / 'token-cache'}",
            "data.synthetic_tokens=20000", "data.batch_size=4", "data.seq_len=32", "model.hidden_size=32",
            "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=32",
            f"schedule.total_steps={TOTAL}", "schedule.warmup_steps=4", "logging.log_every=5", "logging.eval_every=20",
            "logging.eval_batches=2", "logging.weibull_every=10", "logging.progress=false", "logging.report=false",
            "checkpoint.every=10", "checkpoint.resume_every=10", "checkpoint.early=[1, 2]", *extra]  # fmt: skip


def launch(tmp: Path, name: str, *extra: str) -> Path:
    return train(load_config(DEMO, overrides(tmp, name, *extra)))


def records(run: Path, kind: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_jsonl(run / f"{kind}.jsonl")]


def assert_same_run(run: Path, ref: Path, final_snapshot: bool = True) -> None:
    """Bitwise the uninterrupted run: final weights, and every record of every log (each step exactly once)."""
    for kind in KINDS:
        got, want = records(run, kind), records(ref, kind)
        assert [r["step"] for r in got] == [r["step"] for r in want], kind  # no gap, no duplicate
        assert got == want, kind
    files = ["resume/step_000040/model.safetensors"]
    if final_snapshot:
        files.append("checkpoints/step_000040/model.safetensors")
    for name in files:
        a, b = load_file(ref / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list(run.rglob("*.tmp")), "an unfinished write was left behind"
    assert len(ckpt.state_dirs(run)) <= ckpt.KEEP_STATES


def tree_digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the killed processes: bitwise comparisons need the same reduction order
    everywhere, and on a shared 2-core machine a second spinning thread only slows the tiny model down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "runs"


@pytest.fixture(scope="module")
def reference(tmp) -> Path:
    return launch(tmp, "reference")


def copy_of(reference: Path, tmp: Path, name: str) -> Path:
    run = tmp / name
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns(".lock"))
    return run


# ---------------------------------------------------------------------------------------------- the log files
def test_jsonl_marks_cut_back_exactly_and_a_torn_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(tmp_path)
    sink.log("metrics", {"loss": 1.0}, 10)
    marks = sink.marks()
    sink.log("metrics", {"loss": 2.0}, 20)
    sink.close()
    assert marks["metrics"]["bytes"] == len(path.read_bytes().splitlines(keepends=True)[0])
    assert check_prefix(path, marks["metrics"]) is None and JsonlSink(tmp_path).marks()["metrics"] == file_mark(path)
    with path.open("ab") as fh:
        fh.write(b'{"loss": 3.0, "st')  # a kill mid-write
    resumed = JsonlSink(tmp_path, marks=marks)  # back to the moment of the mark: step 20 and the torn line gone
    assert [r["step"] for r in read_jsonl(path)] == [10]
    resumed.log("metrics", {"loss": 2.5}, 20)
    resumed.close()
    with path.open("ab") as fh:
        fh.write(b'{"lo')
    appended = JsonlSink(tmp_path)  # append mode drops the torn line too, so it is never buried mid-file
    appended.log("metrics", {"loss": 3.0}, 30)
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(10, 1.0), (20, 2.5), (30, 3.0)]
    assert appended.marks()["metrics"] == file_mark(path)
    with pytest.raises(ValueError, match="not after the last written step 30"):
        appended.log("metrics", {"loss": 3.0}, 30)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="fewer than the"):
        JsonlSink(tmp_path, marks=marks)


# ---------------------------------------------------------------------------------------------- kills
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(["train.loop", "transformers.models.gpt_neox.modeling_gpt_neox"])


def _train_with_fault(args: list[str], fault: str) -> None:
    os.environ[faults.ENV] = fault
    torch.set_num_threads(1)
    train(load_config(DEMO, args))


def kill_at(tmp: Path, name: str, point: str, step: int, *extra: str) -> None:
    """Run until the fault hook SIGKILLs the process at ``point`` of ``step``; fail if it never got there."""
    proc = _SERVER.Process(target=_train_with_fault, args=(overrides(tmp, name, *extra), f"{point}:{step}"))
    proc.start()
    proc.join(timeout=180)
    assert proc.exitcode == -signal.SIGKILL, f"{point}:{step} never fired (exit code {proc.exitcode})"


def fault_events() -> list[tuple[str, int]]:
    """Every place a kill can land in the tiny run, by step."""
    events = [("step", s) for s in range(1, TOTAL + 1)] + [("log", s) for s in range(5, TOTAL + 1, 5)]
    events += [(f"snapshot.{w}", s) for s in SNAPSHOT_STEPS for w in ("written", "renamed")]
    events += [(f"resume.{w}", s) for s in RESUME_STEPS for w in ("written", "renamed", "pointer")]
    return events


@pytest.mark.parametrize("seed", range(5))
def test_seeded_kills_anywhere_then_rerun_equals_uninterrupted(reference, tmp, seed, capsys):
    rng = random.Random(seed)
    events, chain = fault_events(), []
    while len(chain) < 3:  # up to three kills, each at a later step than the one before
        later = [e for e in events if not chain or e[1] > chain[-1][1]]
        if not later:
            break
        chain.append(rng.choice(later))
    name = f"kills{seed}"
    for point, step in chain:  # each launch continues what the previous kill left, and is killed again
        kill_at(tmp, name, point, step)
    launch(tmp, name)
    assert "resumed from step" in capsys.readouterr().err
    assert_same_run(tmp / name, reference)


def test_kill_before_the_first_resume_state_starts_fresh(reference, tmp, capsys):
    # Killed while the step-0 snapshot was being written: step-0 outputs exist, no resume state does.
    kill_at(tmp, "early", "snapshot.written", 0)
    assert (tmp / "early" / "weibull.jsonl").is_file() and not ckpt.state_dirs(tmp / "early")
    launch(tmp, "early")
    assert "starting fresh: the directory holds only what a start killed" in capsys.readouterr().err
    assert_same_run(tmp / "early", reference)


def test_kill_before_the_first_resume_every_resumes_from_step_0(reference, tmp, capsys):
    kill_at(tmp, "step7", "step", 7)  # the step-5 records are written; the only resume state is step 0's
    assert [r["step"] for r in read_jsonl(tmp / "step7" / "metrics.jsonl")] == [5]
    launch(tmp, "step7")
    assert "resumed from step 0 of 40" in capsys.readouterr().err
    assert_same_run(tmp / "step7", reference)


def test_kill_after_rename_before_pointer_uses_the_complete_newer_state(reference, tmp, capsys):
    kill_at(tmp, "pointer", "resume.renamed", 20)
    assert ckpt.latest_resume_step(tmp / "pointer") == 10
    launch(tmp, "pointer")
    err = capsys.readouterr().err
    assert "still named step_000010, but the newer resume/step_000020 is complete and verified" in err
    assert "resumed from step 20 of 40" in err
    assert_same_run(tmp / "pointer", reference)


# ---------------------------------------------------------------------------------------------- damaged files
def damage(path: Path, how: str, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    if how == "cut":
        path.write_bytes(bytes(data[:at]))
    else:
        data[at] ^= 0x01  # one flipped bit
        path.write_bytes(bytes(data))


def log_marks(run: Path, step: int) -> dict[str, dict]:
    return torch.load(run / "resume" / f"step_{step:06d}" / "state.pt", weights_only=True)["logs"]


STATE_FILES = ("model.safetensors", "state.pt", "manifest.json")
SNAPSHOT_FILES = ("model.safetensors", "config.json", "generation_config.json", "manifest.json")


@pytest.mark.parametrize("how", ["cut", "flip"])
@pytest.mark.parametrize("name", STATE_FILES)
def test_damaged_newest_state_falls_back_to_the_previous_one(reference, tmp, name, how, capsys):
    run = copy_of(reference, tmp, f"newest-{name}-{how}")
    damage(run / "resume" / "step_000040" / name, how)
    launch(tmp, run.name)
    err = capsys.readouterr().err
    assert "skipped resume/step_000040" in err and "resumed from step 30 of 40" in err
    assert_same_run(run, reference)


@pytest.mark.parametrize("how", ["cut", "flip"])
@pytest.mark.parametrize("name", STATE_FILES)
def test_damaged_older_state_is_not_needed(reference, tmp, name, how, capsys):
    run = copy_of(reference, tmp, f"older-{name}-{how}")
    damage(run / "resume" / "step_000030" / name, how)
    launch(tmp, run.name)
    err = capsys.readouterr().err
    assert "resumed from step 40 of 40" in err and "skipped" not in err
    assert_same_run(run, reference)


@pytest.mark.parametrize("how", ["cut", "flip", "delete"])
def test_damaged_or_deleted_pointer_uses_the_newest_verified_state(reference, tmp, how, capsys):
    run = copy_of(reference, tmp, f"pointer-{how}")
    pointer = run / "resume" / "latest.json"
    if how == "delete":
        pointer.unlink()
    else:
        damage(pointer, how, at=pointer.read_bytes().index(b"step_0000") + 10)  # inside the directory name
    launch(tmp, run.name)
    err = capsys.readouterr().err
    assert "resume/latest.json" in err and "using the newest verified state, resume/step_000040" in err
    assert_same_run(run, reference)


def test_pointer_outside_the_run_directory_is_not_followed(reference, tmp, capsys):
    run = copy_of(reference, tmp, "escape")
    outside = tmp / "elsewhere" / "step_000040"
    shutil.copytree(run / "resume" / "step_000040", outside)
    (run / "resume" / "latest.json").write_text(json.dumps(dict(step=40, dir="../../elsewhere/step_000040")))
    launch(tmp, run.name)
    assert "which is not a resume state directory" in capsys.readouterr().err
    assert_same_run(run, reference)
    # A state directory that is a symlink to elsewhere is not one of the run's states either.
    linked = copy_of(reference, tmp, "escape-link")
    shutil.rmtree(linked / "resume" / "step_000040")
    (linked / "resume" / "step_000040").symlink_to(outside, target_is_directory=True)
    launch(tmp, linked.name)
    err = capsys.readouterr().err
    assert "resume/latest.json points outside resume/" in err and "resumed from step 30 of 40" in err
    assert outside.is_dir() and (linked / "resume" / "step_000040").is_dir()
    assert not (linked / "resume" / "step_000040").is_symlink()  # rewritten in place by the resumed run
    assert_same_run(linked, reference)


@pytest.mark.parametrize("how", ["cut", "flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_log_damaged_after_the_previous_state_is_rewritten_from_it(reference, tmp, kind, how, capsys):
    run = copy_of(reference, tmp, f"log-late-{kind}-{how}")
    lo, hi = log_marks(run, 30)[f"{kind}.jsonl"]["bytes"], log_marks(run, 40)[f"{kind}.jsonl"]["bytes"]
    damage(run / f"{kind}.jsonl", how, at=(lo + hi) // 2)  # in the records of steps 31..40
    launch(tmp, run.name)
    err = capsys.readouterr().err
    assert f"skipped resume/step_000040: {kind}.jsonl" in err and "resumed from step 30 of 40" in err
    assert_same_run(run, reference)


@pytest.mark.parametrize("how", ["cut", "flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_log_damaged_before_every_state_is_refused_unless_accepted(reference, tmp, kind, how, capsys):
    run = copy_of(reference, tmp, f"log-early-{kind}-{how}")
    mark = log_marks(run, 30)[f"{kind}.jsonl"]["bytes"]
    damage(run / f"{kind}.jsonl", how, at=mark // 2)
    before = tree_digest(run)
    with pytest.raises(RunDirError, match=rf"(?s)no usable resume state.*{kind}\.jsonl.*run\.accept_damaged_logs"):
        launch(tmp, run.name)
    assert tree_digest(run) == before  # refused: nothing rewritten
    if how == "flip":  # the file is whole, one record is wrong: the user may choose to keep it
        launch(tmp, run.name, "run.accept_damaged_logs=true")
        assert "run.accept_damaged_logs=true: continuing from step 40" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["cut", "flip"])
def test_damaged_config_yaml_and_env_json_are_rewritten(reference, tmp, how, capsys):
    run = copy_of(reference, tmp, f"yaml-{how}")
    damage(run / "config.yaml", how, at=5)
    damage(run / "env.json", how)
    launch(tmp, run.name)
    err = capsys.readouterr().err
    assert "config.yaml" in err and "rewritten" in err and "resumed from step 40 of 40" in err
    got, want = load_config(run / "config.yaml"), load_config(reference / "config.yaml")
    want.run.name = got.run.name
    assert got == want
    assert json.loads((run / "env.json").read_text())["torch"] == torch.__version__
    assert_same_run(run, reference)


@pytest.mark.parametrize("how", ["cut", "flip"])
@pytest.mark.parametrize("name", SNAPSHOT_FILES)
def test_damaged_snapshot_is_detected_on_load_and_reported(reference, tmp, name, how, capsys):
    from instrumented_adamw.analysis.analyze import _load_snapshot

    run = copy_of(reference, tmp, f"snap-{name}-{how}")
    snap = run / "checkpoints" / "step_000020"
    damage(snap / name, how)
    problems = verify_manifest(snap)
    assert problems  # checksums catch every damaged file of a snapshot
    with pytest.raises(ValueError, match="step_000020 is damaged"):
        _load_snapshot(snap / "model.safetensors", "cpu")
    launch(tmp, run.name)  # training reads no snapshot: the run resumes as it was
    err = capsys.readouterr().err
    assert "resumed from step 40 of 40" in err
    if how == "cut":  # a resume checks every snapshot's file sizes (cheap), not their checksums
        assert "checkpoints/step_000020 is damaged" in err
    assert_same_run(run, reference)


# ---------------------------------------------------------------------------------------------- careless reruns
def test_no_resume_state_with_outputs_is_refused_then_overwritten_on_request(reference, tmp, capsys):
    run = copy_of(reference, tmp, "no-state")
    shutil.rmtree(run / "resume")
    before = tree_digest(run)
    with pytest.raises(RunDirError, match=r"(?s)no usable resume state.*metrics\.jsonl: 8 records, steps 5\.\.40.*"
                                          r"checkpoints/: 7 snapshots.*run\.overwrite=true"):  # fmt: skip
        launch(tmp, run.name)
    assert tree_digest(run) == before
    with pytest.raises(RunDirError, match=r"run\.resume=false, but .* holds an earlier run"):
        launch(tmp, run.name, "run.resume=false")
    launch(tmp, run.name, "run.overwrite=true")
    assert "run.overwrite=true: deleting" in capsys.readouterr().err
    assert_same_run(run, reference)


def test_changed_config_is_refused_with_a_diff_or_recorded_with_its_step(reference, tmp, capsys):
    run = copy_of(reference, tmp, "changed")
    before = tree_digest(run)
    with pytest.raises(ConfigChangedError, match=r"optim\.lr: 0\.003 -> 0\.01\n.*run\.allow_config_change=true"):
        launch(tmp, run.name, "optim.lr=1e-2")
    assert tree_digest(run) == before
    launch(tmp, run.name, "logging.progress=true", "run.device=cpu")  # how a run is watched may change freely
    assert "resumed from step 40 of 40" in capsys.readouterr().err
    # Extending the run is a change too; accepted, it is recorded once, even when the launch is killed and rerun.
    longer = ("schedule.total_steps=50", "run.allow_config_change=true")
    kill_at(tmp, run.name, "step", 43, *longer)
    launch(tmp, run.name, *longer)
    changes = read_jsonl(run / "config_changes.jsonl")
    assert [(c["step"], c["changes"]) for c in changes] == [(40, {"schedule.total_steps": {"old": 40, "new": 50}})]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(5, 51, 5))
    assert load_config(run / "config.yaml").schedule.total_steps == 50
    launch(tmp, run.name, "schedule.total_steps=50")  # the run's config is now the longer one: no diff
    assert "resumed from step 50 of 50" in capsys.readouterr().err


def test_damaged_config_changes_log_falls_back_and_records_the_change_once(reference, tmp, capsys):
    run = copy_of(reference, tmp, "changes-damaged")
    longer = ("schedule.total_steps=50", "run.allow_config_change=true")
    launch(tmp, run.name, *longer)
    before = {kind: records(run, kind) for kind in KINDS}
    changes = read_jsonl(run / "config_changes.jsonl")
    damage(run / "config_changes.jsonl", "flip", at=3)
    launch(tmp, run.name, *longer)
    err = capsys.readouterr().err
    assert "skipped resume/step_000050: config_changes.jsonl differs" in err and "resumed from step 40 of 50" in err
    assert [{k: v for k, v in c.items() if k != "time"} for c in read_jsonl(run / "config_changes.jsonl")] == [
        {k: v for k, v in c.items() if k != "time"} for c in changes
    ]
    assert {kind: records(run, kind) for kind in KINDS} == before


def test_second_launch_is_refused_naming_the_holder(tmp):
    run = tmp / "locked"
    with run_lock(run):
        with pytest.raises(RunLockedError, match=rf"in use by another launch \(pid {os.getpid()} on "):
            launch(tmp, "locked")
        assert not (run / "metrics.jsonl").exists()
    launch(tmp, "locked")  # released: the next launch runs (a killed holder releases it the same way)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][-1] == TOTAL


# ---------------------------------------------------------------------------------------------- NaN
def test_divergence_stops_naming_the_step_without_saving_nan(tmp):
    # lr 1e30: step 1 leaves huge but finite weights (its snapshot is written), step 2 overflows them. The snapshot
    # due at step 2 is not written; the interval so far is logged, so the counts are on record.
    expected = r"step 2: the weights hold NaN or Inf; the loss has been NaN or Inf since step 2\. .*step 0\) is finite"
    with pytest.raises(NonFiniteError, match=expected):
        launch(tmp, "diverged", "optim.lr=1e30")
    run = tmp / "diverged"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [2] and metrics[0]["loss"] is None
    assert metrics[0]["nonfinite/loss_steps"] == 1
    assert any(metrics[0][k] > 0 for k in metrics[0] if k.endswith("/nonfinite_steps"))  # the forces too
    assert [ckpt.dir_step(d) for d in ckpt.state_dirs(run)] == [0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000", "step_000001"]
    for snap in (run / "checkpoints").iterdir():
        weights = load_file(snap / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), snap.name
    assert "loss NaN/Inf" in summary_line(run)


def _poison_loss(monkeypatch, first: int, last: int, poison) -> None:
    """Apply ``poison`` to the training loss of steps ``first..last`` (1-based): ``loss * nan`` poisons the
    gradients too, ``loss + inf`` leaves them finite."""
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if kwargs.get("reduction", "mean") != "mean":
            return loss  # evaluation
        calls["n"] += 1
        return poison(loss) if first <= calls["n"] <= last else loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


def test_transient_nan_stops_and_a_rerun_continues_bitwise(reference, tmp, monkeypatch, capsys):
    _poison_loss(monkeypatch, 23, 23, lambda loss: loss * math.nan)
    with pytest.raises(NonFiniteError, match=r"step 25: the weights hold NaN or Inf; the loss has been NaN or Inf "
                                             r"since step 23.*last resume state \(step 20\) is finite"):  # fmt: skip
        launch(tmp, "transient")
    metrics = read_jsonl(tmp / "transient" / "metrics.jsonl")
    assert metrics[-1]["step"] == 25 and metrics[-1]["nonfinite/loss_steps"] == 3
    monkeypatch.undo()
    launch(tmp, "transient")
    assert "resumed from step 20 of 40" in capsys.readouterr().err
    assert_same_run(tmp / "transient", reference)


def test_nonfinite_loss_in_a_row_stops_at_the_limit(tmp):
    monkeypatch = pytest.MonkeyPatch()
    _poison_loss(monkeypatch, 12, 99, lambda loss: loss + math.inf)  # finite gradients: only the count stops it
    try:
        with pytest.raises(NonFiniteError, match=r"step 15: the loss has been NaN or Inf for 4 steps in a row, "
                                                 r"since step 12 \(run.max_nonfinite_steps=3\)"):  # fmt: skip
            launch(tmp, "inf-loss", "run.max_nonfinite_steps=3")
    finally:
        monkeypatch.undo()
    metrics = read_jsonl(tmp / "inf-loss" / "metrics.jsonl")
    assert [m["nonfinite/loss_steps"] for m in metrics] == [0, 0, 4]
    assert ckpt.latest_resume_step(tmp / "inf-loss") == 10


def test_resume_state_restores_the_random_number_generators(tmp_path):
    """What a resumed run draws from torch's generator is what the uninterrupted run would have drawn (dropout,
    random data windows, anything seeded once at start)."""
    model = torch.nn.Linear(4, 3)
    opt = InstrumentedAdamW(model.named_parameters())
    torch.manual_seed(7)
    torch.rand(11)  # some of the stream used before the save
    ckpt.save_resume(tmp_path, 10, model, opt, config={}, logs={}, extra={}, keep=None)
    want = torch.rand(5)
    torch.manual_seed(12345)  # a fresh process would start from wherever its own seeding left it
    state, notes = ckpt.find_resume_state(tmp_path, lambda s: None)
    assert state is not None and state.step == 10 and not notes
    ckpt.apply_state(state, model, opt)
    assert torch.equal(torch.rand(5), want)


# ---------------------------------------------------------------------------------------------- preemption
def _start(tmp: Path, name: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "train", str(DEMO), *overrides(tmp, name)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_log(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        logged = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if logged and logged[-1]["step"] >= step:
            return
        time.sleep(0.02)
    pytest.fail(f"the run never logged step {step}")


def test_sigterm_saves_where_it_stopped_and_the_rerun_continues_bitwise(reference, tmp, capsys):
    """A real SIGTERM to `python -m train`: the step in progress finishes, its interval is logged, its resume state
    saved; one line says where it stopped and how to continue; exit status 128 + 15. The same command then goes on
    from that step: final weights bitwise the uninterrupted run's, every step in the logs exactly once."""
    proc = _start(tmp, "sigterm")
    _wait_for_log(tmp / "sigterm", 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    found = re.search(r"stopped by SIGTERM after step (\d+) of 40; the resume state of step \1 is saved in (.+)\. "
                      r"To continue from step \1: python -m train .*demo\.yaml", err)  # fmt: skip
    assert found, err[-3000:]
    stopped = int(found.group(1))
    assert 5 <= stopped < 40 and (tmp / "sigterm" / "resume" / f"step_{stopped:06d}").is_dir()
    run = launch(tmp, "sigterm")
    assert f"resumed from step {stopped} of 40" in capsys.readouterr().err
    for name in ("resume/step_000040/model.safetensors", "checkpoints/step_000040/model.safetensors"):
        a, b = load_file(reference / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    forces = read_jsonl(run / "forces.jsonl")
    steps = [r["step"] for r in forces]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    assert sum(max(c["steps"] for c in r["classes"].values()) for r in forces) == 40  # each step once
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == steps


def test_a_second_signal_ends_the_process_at_once():
    """The first SIGTERM or SIGINT only asks the loop to stop after its step; a second one kills as if no handler
    were installed (the newest verified state is safe at any moment)."""
    code = """
import os, signal, time
from train.loop import StopSignals
with StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    print("first:", stop.signum, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("not reached", flush=True)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout == f"first: {int(signal.SIGINT)}\n"
    assert "SIGINT: stopping after this step and saving a resume point" in done.stderr


def test_a_learning_rate_changed_on_resume_is_the_one_applied(reference, tmp):
    """optim.lr changed with run.allow_config_change=true: the steps after the resume take the new schedule (the
    optimizer's peaks come from this launch's config, not from the loaded state)."""
    from train.loop import lr_at

    run = launch(tmp, "new-lr", "schedule.stop_at=20")
    launch(tmp, run.name, "optim.lr=1e-2", "run.allow_config_change=true")
    cfg = load_config(run / "config.yaml")
    forces = {r["step"]: r for r in read_jsonl(run / "forces.jsonl")}
    lrs = [t["last_lr"] for t in forces[25]["tensors"].values()]
    assert lrs and all(lr == pytest.approx(lr_at(24, 1e-2, cfg.schedule), rel=1e-12) for lr in lrs), lrs[:3]
