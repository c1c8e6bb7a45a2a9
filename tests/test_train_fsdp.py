"""The trainer under FSDP2 (torchrun, 2 gloo processes on CPU): matches one process; kill -9 + rerun is exact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instrumented_adamw.sinks import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 60


def command(tmp: Path, name: str, strategy: str) -> list[str]:
    args = [str(ROOT / "configs" / "demo.yaml"), f"run.out_dir={tmp}", f"run.name={name}",
            f"data.cache_dir={tmp / 'cache'}", "data.synthetic_tokens=50000", f"schedule.total_steps={TOTAL}",
            "schedule.warmup_steps=2", "logging.log_every=10", "logging.eval_every=20", "logging.weibull_every=20",
            "logging.progress=false", "logging.report=false", "checkpoint.every=20", "checkpoint.resume_every=20",
            "checkpoint.early=[]", f"distributed.strategy={strategy}"]  # fmt: skip
    if strategy == "none":
        return [sys.executable, "-m", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *args]


ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts its workers in sessions of their own, so killing
    torchrun's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun and every worker it started, at once; returns the workers' pids."""
    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return pids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    run(command(tmp, "fsdp", "fsdp"))
    return tmp / "fsdp"


def test_fsdp_run_matches_single_process(fsdp_run, tmp_path):
    run(command(tmp_path, "single", "none"))
    a, b = read_jsonl(tmp_path / "single" / "metrics.jsonl"), read_jsonl(fsdp_run / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(10, TOTAL + 1, 10))
    for ra, rb in zip(a, b, strict=True):
        # Same global batch, gradients averaged over 2 shards of it: fp32 rounding only.
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
        for key in ("Transmission/align_share", "Transmission/rms", "QKV/inject_share", "Transmission/t_over_tau"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3), key
    # Forces are global sums over shards: per-tensor values match too, and fits see the gathered matrices.
    fa, fb = read_jsonl(tmp_path / "single" / "forces.jsonl")[-1], read_jsonl(fsdp_run / "forces.jsonl")[-1]
    for name, t in fa["tensors"].items():
        assert fb["tensors"][name]["w_sq_now"] == pytest.approx(t["w_sq_now"], rel=1e-4)
        assert fb["tensors"][name]["numel"] == t["numel"]
    wa, wb = read_jsonl(tmp_path / "single" / "weibull.jsonl"), read_jsonl(fsdp_run / "weibull.jsonl")
    assert [r["step"] for r in wb] == [0, 20, 40, 60]
    assert [x["k"] for x in wb[0]["blocks"]] == [x["k"] for x in wa[0]["blocks"]]  # step 0: identical weights
    # Snapshots gathered from the shards are HF directories like the single-process ones (transformers may name
    # the head lm_head or embed_out in the file; from_pretrained reads both).
    from transformers import AutoModelForCausalLM

    snap = AutoModelForCausalLM.from_pretrained(fsdp_run / "checkpoints" / "step_000060").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "checkpoints" / "step_000060").state_dict()
    assert snap.keys() == ref.keys()
    for k in ref:
        # Adam normalises each element's step: where a gradient element is ~0, fp32 rounding of the averaged
        # gradient can flip its update (±η per step), so elements may part by a few η; weights are ~0.02.
        torch.testing.assert_close(snap[k], ref[k], rtol=1e-3, atol=1e-4)


def test_fsdp_kill_and_rerun_equals_uninterrupted(fsdp_run, tmp_path):
    cmd = command(tmp_path, "fsdp", "fsdp")
    # First every rank is killed at step 7, before the first resume_every: the rerun continues from the sharded
    # step-0 state (weights only: Adam has no state yet). That rerun is then killed from outside, mid-flight.
    early = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, INSTRUMENTED_ADAMW_FAULT="step:7"), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert early.returncode != 0
    assert json.loads((tmp_path / "fsdp" / "resume" / "latest.json").read_text())["step"] == 0
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    pointer = tmp_path / "fsdp" / "resume" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert json.loads(pointer.read_text())["step"] >= 20
    workers = kill_tree(proc)  # torchrun and both workers, wherever their sessions are
    assert len([p for p in workers if "train" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
                or True]) >= 2  # fmt: skip
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in _state(p)], "a worker survived"
    killed_at = json.loads(pointer.read_text())["step"]
    assert 20 <= killed_at < TOTAL  # it really stopped mid-run: the rerun has steps to do
    run(cmd)
    a = load_file(fsdp_run / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    ref, got = read_jsonl(fsdp_run / "metrics.jsonl"), read_jsonl(tmp_path / "fsdp" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["Transmission/t_over_tau"] for r in got] == [r["Transmission/t_over_tau"] for r in ref]
    # The force intervals after each resume count only real steps (loading DCP optimizer state takes a step of lr 0).
    ref_f, got_f = read_jsonl(fsdp_run / "forces.jsonl"), read_jsonl(tmp_path / "fsdp" / "forces.jsonl")
    assert [r["classes"] for r in got_f] == [r["classes"] for r in ref_f]


def test_fsdp_sigterm_stops_every_rank_at_a_log_step_and_the_rerun_is_bitwise(fsdp_run, tmp_path):
    """SIGTERM to torchrun (as a scheduler sends it): torchrun passes it to both workers, which agree on the next
    log step, save its resume state together and exit; the same command then continues bitwise."""
    cmd = command(tmp_path, "fsdp", "fsdp")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    metrics = tmp_path / "fsdp" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and read_jsonl(metrics) and read_jsonl(metrics)[-1]["step"] >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    found = re.search(r"stopped by SIGTERM after step (\d+) of 60", err)
    assert found, err[-3000:]
    stopped = int(found.group(1))
    assert stopped % 10 == 0 and 10 <= stopped < TOTAL, stopped  # on a log step, mid-run
    assert (tmp_path / "fsdp" / "resume" / f"step_{stopped:06d}").is_dir()
    run(cmd)
    a = load_file(fsdp_run / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "checkpoints" / f"step_{TOTAL:06d}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    ref, got = read_jsonl(fsdp_run / "metrics.jsonl"), read_jsonl(metrics)
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in ref]
