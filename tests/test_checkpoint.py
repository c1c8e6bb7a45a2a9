"""train/checkpoint.py on its own: the save protocol, retention, the pointer, and what loading refuses.

Fast unit tests on a tiny tied-embedding module (and a tiny HF model for snapshots) in ``tmp_path``; the whole-loop
consequences (kills at each fault point, bitwise resume) are tests/test_train_faults.py's. Durability (fsync of a
directory after a rename, a directory created durably before it is written into) cannot be seen by reading the
files back, so those tests record the calls of the save and check the documented order: files written and
checksummed in ``.tmp``, renamed, the parent fsync'd, only then ``latest.json`` switched, then old states deleted.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from instrumented_adamw.utils.durable_io import read_manifest, verify_manifest, write_manifest
from train import checkpoint as ckpt

CONFIG = {"optim": {"lr": 0.1}, "run": {"name": "unit"}}
LOGS = {"metrics.jsonl": {"bytes": 12, "sha256": "0" * 64}}


class Tied(torch.nn.Module):
    """An embedding tied to the output head (GPT-style): one storage under two state-dict names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def trained(seed: int = 0) -> tuple[Tied, torch.optim.AdamW]:
    """A model and an optimizer after one step, so the optimizer holds Adam moments to save."""
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.head(model.embed(torch.tensor([1, 2, 3]))).square().mean().backward()
    opt.step()
    return model, opt


def save(run: Path, step: int, keep: str | None = None, seed: int = 0, extra: dict | None = None) -> str:
    model, opt = trained(seed)
    return ckpt.save_resume(run, step, model, opt, config=CONFIG, logs=LOGS, extra=extra or {"seed": seed}, keep=keep)


def rewrite_state(directory: Path, **changes) -> None:
    """Change entries of ``state.pt`` and re-checksum, so only the change (not the manifest) can reject it."""
    meta = torch.load(directory / "state.pt", weights_only=True)
    meta.update(changes)
    torch.save(meta, directory / "state.pt")
    write_manifest(directory, read_manifest(directory))  # keeps its other entries, lists the files anew


def all_logs_match(state: ckpt.ResumeState) -> str | None:
    return None


@pytest.fixture
def events(monkeypatch, tmp_path) -> list[tuple]:
    """The file-system steps of a save as they happen, paths relative to ``tmp_path``.

    Records the module's own ``fsync_dir``, ``remove``, ``write_durably``, ``write_manifest`` and fault points, and
    every ``os.replace`` — except those inside ``write_durably`` (integrity.py's own protocol, recorded as one step)."""
    log: list[tuple] = []
    quiet = []

    def rel(arg):
        if isinstance(arg, (str, Path)) and Path(arg).is_relative_to(tmp_path):
            return Path(arg).relative_to(tmp_path).as_posix()
        return arg  # a fault point's name and step

    def recorded(name, real, nargs=None):
        def call(*args):
            if not quiet:
                log.append((name, *map(rel, args[:nargs])))
            return real(*args)

        return call

    def durably(path, data):
        log.append(("write_durably", rel(path)))
        quiet.append(True)
        try:
            real_durably(path, data)
        finally:
            quiet.pop()

    real_durably = ckpt.write_durably
    monkeypatch.setattr(ckpt, "fsync_dir", recorded("fsync_dir", ckpt.fsync_dir))
    monkeypatch.setattr(ckpt, "remove", recorded("remove", ckpt.remove))
    monkeypatch.setattr(ckpt, "write_manifest", recorded("write_manifest", ckpt.write_manifest, 1))
    monkeypatch.setattr(ckpt, "fault_point", recorded("fault", lambda name, step: None))
    monkeypatch.setattr(ckpt, "write_durably", durably)
    monkeypatch.setattr(os, "replace", recorded("replace", os.replace))
    return log


# ---------------------------------------------------------------------------------------------- file helpers
def test_make_dir_creates_every_missing_level_durably(tmp_path, events):
    ckpt._make_dir(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    # Each new entry is durable only once the directory holding it is fsync'd: the parent of each, top down.
    assert events == [("fsync_dir", "."), ("fsync_dir", "a"), ("fsync_dir", "a/b")]
    events.clear()
    ckpt._make_dir(tmp_path / "a" / "b")
    assert events == []  # nothing created, nothing to make durable


def test_remove_deletes_files_trees_and_links_but_not_what_a_link_points_to(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "f").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    file = tmp_path / "file"
    file.write_text("x")
    tree = tmp_path / "tree"
    (tree / "deep").mkdir(parents=True)
    (tree / "deep" / "f").write_text("x")

    for path in (link, dangling, file, tree, tmp_path / "never-there"):
        ckpt.remove(path)
        assert not path.exists() and not path.is_symlink(), path
    assert (elsewhere / "sub" / "f").read_text() == "x"


def test_dir_step_reads_only_complete_state_names():
    assert ckpt.dir_step(Path("resume") / ckpt.step_name(40)) == 40
    assert ckpt.dir_step(Path("step_1234567")) == 1234567
    for name in ("step_000040.tmp", "step_40", "latest.json", "xstep_000040"):
        assert ckpt.dir_step(Path(name)) is None, name


# ---------------------------------------------------------------------------------------------- snapshots
@pytest.fixture(scope="module")
def hf_model():
    from models import tiny_model

    return tiny_model("llama")


def test_snapshot_is_a_verified_hf_directory(tmp_path, hf_model):
    from transformers import AutoModelForCausalLM

    opt = torch.optim.AdamW(hf_model.parameters(), lr=0.0)
    hf_model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    hf_model.zero_grad()
    run = tmp_path / "run"
    final = ckpt.save_snapshot(run, 7, hf_model, opt)

    assert final == ckpt.snapshot_dir(run, 7) == run / "checkpoints" / "step_000007"
    assert sorted(p.name for p in run.joinpath("checkpoints").iterdir()) == ["step_000007"]  # no .tmp left
    assert verify_manifest(final) == [] and read_manifest(final)["step"] == 7
    assert {"config.json", "model.safetensors", "optimizer.pt"} <= set(read_manifest(final)["files"])
    loaded = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in hf_model.state_dict().items())
    moments = torch.load(final / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(moments[i]["exp_avg"], opt.state[p]["exp_avg"]) for i, p in enumerate(hf_model.parameters()))

    # Without an optimizer: the weights only. A leftover .tmp of a killed save and a damaged directory at this
    # step (one that verification rejected) are replaced, not merged into.
    (final / "stale.bin").write_bytes(b"x")
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir()
    (tmp / "junk").write_bytes(b"x")
    ckpt.save_snapshot(run, 7, hf_model)
    assert verify_manifest(final) == [] and read_manifest(final)["step"] == 7
    files = {p.name for p in final.iterdir()}
    assert files == set(read_manifest(final)["files"]) | {"manifest.json"}
    assert {"config.json", "model.safetensors"} <= files and not {"optimizer.pt", "stale.bin", "junk"} & files
    assert not tmp.exists()


def test_snapshot_protocol_makes_every_step_durable(tmp_path, hf_model, events, monkeypatch):
    real = hf_model.save_pretrained

    def save_pretrained(path, **kwargs):
        events.append(("save_pretrained", Path(path).relative_to(tmp_path).as_posix()))
        return real(path, **kwargs)

    monkeypatch.setattr(hf_model, "save_pretrained", save_pretrained)
    ckpt.save_snapshot(tmp_path / "run", 20, hf_model)
    tmp, final = "run/checkpoints/step_000020.tmp", "run/checkpoints/step_000020"
    assert events == [
        # run/ and run/checkpoints/ are created, each entry made durable, before anything is written into them
        ("fsync_dir", "."),
        ("fsync_dir", "run"),
        ("remove", tmp),
        ("save_pretrained", tmp),
        ("write_manifest", tmp),  # checksummed (and fsync'd) last: a directory without a manifest is incomplete
        ("fault", "snapshot.written", 20),
        ("remove", final),
        ("replace", tmp, final),
        ("fsync_dir", "run/checkpoints"),  # the rename is durable only once its directory is on disk
        ("fault", "snapshot.renamed", 20),
    ]


# ---------------------------------------------------------------------------------------------- resume states
def test_resume_state_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = trained(seed=3)
    name = ckpt.save_resume(tmp_path, 10, model, opt, config=CONFIG, logs=LOGS, extra={"m": [1, 2]}, keep=None)
    after_save = torch.rand(4)  # what the run would draw next
    assert name == "step_000010"
    directory = tmp_path / "resume" / name
    assert verify_manifest(directory) == []
    assert read_manifest(directory)["step"] == 10
    assert json.loads((tmp_path / "resume" / "latest.json").read_text()) == dict(step=10, dir=name, sharded=False)

    state = ckpt.read_state(directory)
    assert (state.step, state.directory, state.sharded) == (10, directory, False)
    assert (state.config, state.logs, state.extra) == (CONFIG, LOGS, {"m": [1, 2]})
    assert set(state.weights) == {"embed.weight", "head.weight"}  # tied: saved once per name

    fresh, fresh_opt = trained(seed=4)
    torch.manual_seed(99)
    ckpt.apply_state(state, fresh, fresh_opt)
    assert torch.equal(torch.rand(4), after_save)
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight
    ours, theirs = fresh_opt.state_dict(), opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert all(torch.equal(ours["state"][0][k], theirs["state"][0][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert state.weights is None and state.optimizer is None  # the host copies are freed once applied


def test_resume_protocol_switches_the_pointer_only_after_a_durable_rename(tmp_path, events):
    save(tmp_path, 0)
    save(tmp_path, 10, keep="step_000000")
    events.clear()
    save(tmp_path, 20, keep="step_000010")
    tmp, final = "resume/step_000020.tmp", "resume/step_000020"
    assert events == [
        ("remove", tmp),
        ("write_manifest", tmp),
        ("fault", "resume.written", 20),
        ("remove", final),
        ("replace", tmp, final),
        ("fsync_dir", "resume"),  # the new state is on disk under its name ...
        ("fault", "resume.renamed", 20),
        ("write_durably", "resume/latest.json"),  # ... before the pointer names it
        ("fault", "resume.pointer", 20),
        ("remove", "resume/step_000000"),  # and only then the state before the last good one goes
        ("fsync_dir", "resume"),
    ]


def test_resume_protocol_creates_resume_dir_durably(tmp_path, events):
    save(tmp_path / "run", 0)
    assert events[:2] == [("fsync_dir", "."), ("fsync_dir", "run")]  # run/, then run/resume/, each made durable
    assert ("fsync_dir", "run/resume") in events


def test_two_states_are_kept_the_newest_and_the_last_good_one(tmp_path):
    kept = None
    for step in (0, 10, 20, 30, 40):
        name = save(tmp_path, step, keep=kept)
        want = [ckpt.step_name(step)] + ([kept] if kept else [])
        assert [p.name for p in ckpt.state_dirs(tmp_path)] == want
        assert ckpt.latest_resume_step(tmp_path) == step
        kept = name
    assert len(ckpt.state_dirs(tmp_path)) == ckpt.KEEP_STATES
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["latest.json", "step_000030", "step_000040"]


def test_commit_keeps_the_named_good_state_and_clears_leftovers(tmp_path):
    for step in (0, 10, 20):
        save(tmp_path, step, keep=ckpt.step_name(step - 10) if step else None)
    (tmp_path / "resume" / "step_000050.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "resume" / "stray.txt").write_text("x")
    # The last good state need not be the previous one (e.g. step 20 was found damaged on resume): keep names it.
    save(tmp_path, 30, keep="step_000010")
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["latest.json", "step_000010", "step_000030"]
    save(tmp_path, 40, keep=None)
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["latest.json", "step_000040"]


def test_a_rejected_state_at_the_same_step_is_replaced(tmp_path):
    save(tmp_path, 10, seed=1)
    directory = tmp_path / "resume" / "step_000010"
    (directory / "state.pt").write_bytes(b"damaged")
    (directory / "leftover").write_bytes(b"x")
    (tmp_path / "resume" / "step_000010.tmp").mkdir()
    (tmp_path / "resume" / "step_000010.tmp" / "junk").write_bytes(b"x")
    save(tmp_path, 10, seed=2)
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.safetensors", "state.pt"]
    assert ckpt.read_state(directory).extra == {"seed": 2}


# ---------------------------------------------------------------------------------------------- the pointer
def write_pointer(run: Path, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (run / "resume" / "latest.json").write_text(text)


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "is missing"),
        ("{not json", "unreadable (JSONDecodeError"),
        ("[1, 2]", "unreadable (TypeError"),
        ({"dir": "step_000010"}, "unreadable (KeyError"),
        ({"dir": "step_000010", "step": "ten"}, "unreadable (ValueError"),
        ({"dir": "step_000010", "step": 20}, "not a resume state directory of step 20"),
        ({"dir": "../step_000010", "step": 10}, "not a resume state directory"),
        ({"dir": 10, "step": 10}, "not a resume state directory"),
        ({"dir": "step_000010.tmp", "step": 10}, "not a resume state directory"),
        ({"dir": "step_000020", "step": 20}, "which does not exist"),
        ({"dir": "step_000030", "step": 30}, "points outside resume/"),
    ],
)
def test_pointer_is_only_a_name_inside_resume(tmp_path, content, problem):
    save(tmp_path, 10)
    (tmp_path / "elsewhere" / "step_000030").mkdir(parents=True)
    (tmp_path / "resume" / "step_000030").symlink_to(tmp_path / "elsewhere" / "step_000030")
    if content is None:
        (tmp_path / "resume" / "latest.json").unlink()
    else:
        write_pointer(tmp_path, content)
    name, why = ckpt.read_pointer(tmp_path)
    assert name is None and problem in why
    assert ckpt.latest_resume_step(tmp_path) is None


def test_pointer_names_the_saved_state(tmp_path):
    save(tmp_path, 10)
    assert ckpt.read_pointer(tmp_path) == ("step_000010", None)
    assert ckpt.latest_resume_step(tmp_path) == 10
    write_pointer(tmp_path, {"dir": "step_000010", "step": 10, "sharded": False, "more": "ignored"})
    assert ckpt.read_pointer(tmp_path) == ("step_000010", None)


def test_state_dirs_lists_complete_states_of_this_run_newest_first(tmp_path):
    assert ckpt.state_dirs(tmp_path) == []  # no resume/ at all
    root = tmp_path / "resume"
    for name in ("step_999999", "step_1000000", "step_000010", "step_000020.tmp", "other"):
        (root / name).mkdir(parents=True)
    (root / "step_000030").write_text("a file, not a state")
    (tmp_path / "elsewhere" / "step_000040").mkdir(parents=True)
    (root / "step_000040").symlink_to(tmp_path / "elsewhere" / "step_000040")
    # Sorted by step, not by name ("step_1000000" < "step_999999" as strings).
    assert [p.name for p in ckpt.state_dirs(tmp_path)] == ["step_1000000", "step_999999", "step_000010"]


# ---------------------------------------------------------------------------------------------- verification
def test_read_state_rejects_damage_and_foreign_content(tmp_path):
    root = tmp_path / "resume"
    save(tmp_path, 10)
    directory = root / "step_000010"

    data = bytearray((directory / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (directory / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        ckpt.read_state(directory)
    ckpt.read_state(directory, verify=False)  # a flipped weight bit: only the checksum can tell

    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors cannot be loaded"):
        ckpt.read_state(directory, verify=False)

    (directory / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        ckpt.read_state(directory)


class NotAllowed:
    """Any class: ``torch.load(weights_only=True)`` must refuse to build it (a crafted file cannot run code)."""


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": ckpt.STATE_FORMAT + 1}, "is not a format-"),
        ({"format": None}, "is not a format-"),
        ({"step": 20}, "resume state of step 10"),
        ({"config": None}, "lacks part of a resume state"),
        ({"optimizer": {"state": {}}}, "lacks part of a resume state"),
        ({"optimizer": {"param_groups": []}}, "lacks part of a resume state"),
        ({"rng": None}, "lacks part of a resume state"),
        ({"extra": NotAllowed()}, "state.pt cannot be loaded"),
    ],
)
def test_read_state_rejects_a_state_pt_that_is_not_this_format(tmp_path, changes, message):
    save(tmp_path, 10)
    directory = tmp_path / "resume" / "step_000010"
    rewrite_state(directory, **changes)
    assert verify_manifest(directory) == []
    with pytest.raises(ValueError, match=message):
        ckpt.read_state(directory)


def test_read_state_rejects_a_state_pt_that_is_not_a_dict(tmp_path):
    save(tmp_path, 10)
    directory = tmp_path / "resume" / "step_000010"
    torch.save([1, 2], directory / "state.pt")
    with pytest.raises(ValueError, match="is not a format-"):
        ckpt.read_state(directory, verify=False)


def test_read_state_rejects_nonfinite_weights_and_moments(tmp_path):
    save(tmp_path, 10)
    directory = tmp_path / "resume" / "step_000010"
    weights = load_file(directory / "model.safetensors")
    good = {k: v.clone() for k, v in weights.items()}
    weights["embed.weight"][0, 1] = float("inf")
    save_file(weights, directory / "model.safetensors")
    write_manifest(directory, read_manifest(directory))
    with pytest.raises(ValueError, match="embed.weight holds NaN or Inf"):
        ckpt.read_state(directory)

    save_file(good, directory / "model.safetensors")
    optimizer = torch.load(directory / "state.pt", weights_only=True)["optimizer"]
    optimizer["state"][0]["exp_avg_sq"][2, 0] = float("nan")
    rewrite_state(directory, optimizer=optimizer)
    with pytest.raises(ValueError, match="optimizer state 0.exp_avg_sq holds NaN or Inf"):
        ckpt.read_state(directory)


def test_nonfinite_names_the_first_bad_float_tensor_in_a_nested_structure():
    ok = {"a": torch.ones(2), "n": torch.tensor([7], dtype=torch.int64), "s": "text", "x": 1.5}
    assert ckpt._nonfinite(ok) is None
    nested = {"ok": ok, "groups": [{"w": torch.zeros(2)}, (torch.ones(1), torch.tensor([float("-inf")]))]}
    assert ckpt._nonfinite(nested, "p ") == "p groups.1.1"


def test_all_finite_on_one_process():
    assert ckpt.all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not ckpt.all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not ckpt.all_finite([torch.tensor([float("inf")])])
    assert ckpt.all_finite([torch.arange(3), torch.empty(0)])  # integers cannot be NaN; empty tensors hold none
    assert ckpt.all_finite([])


# ---------------------------------------------------------------------------------------------- choosing a state
def test_find_resume_state_takes_the_newest_verified_state(tmp_path):
    assert ckpt.find_resume_state(tmp_path, all_logs_match) == (None, [])  # a fresh run: nothing to say
    save(tmp_path, 10)
    save(tmp_path, 20, keep="step_000010")
    state, notes = ckpt.find_resume_state(tmp_path, all_logs_match)
    assert state.step == 20 and notes == []


def test_find_resume_state_falls_back_past_a_damaged_state_or_mismatched_logs(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20, keep="step_000010")
    (tmp_path / "resume" / "step_000020" / "state.pt").write_bytes(b"damaged")
    state, notes = ckpt.find_resume_state(tmp_path, all_logs_match)
    assert state.step == 10
    assert len(notes) == 1 and notes[0].startswith("skipped resume/step_000020: state.pt has 7 bytes")

    state, notes = ckpt.find_resume_state(tmp_path, lambda s: "metrics.jsonl was cut short")
    assert state is None and len(notes) == 2
    assert notes[0].startswith("skipped resume/step_000020: state.pt has 7 bytes")
    assert notes[1] == "skipped resume/step_000010: metrics.jsonl was cut short"


def test_find_resume_state_uses_a_complete_state_the_pointer_does_not_name_yet(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20, keep="step_000010")
    write_pointer(tmp_path, {"step": 10, "dir": "step_000010", "sharded": False})  # killed before the switch
    state, notes = ckpt.find_resume_state(tmp_path, all_logs_match)
    assert state.step == 20
    assert len(notes) == 1 and "still named step_000010" in notes[0] and "resume/step_000020" in notes[0]

    # The pointer naming the older state because the newer one was rejected is no news: no note for that.
    state, notes = ckpt.find_resume_state(tmp_path, lambda s: "logs differ" if s.step == 20 else None)
    assert state.step == 10 and notes == ["skipped resume/step_000020: logs differ"]


def test_find_resume_state_reports_an_unusable_pointer(tmp_path):
    save(tmp_path, 10)
    write_pointer(tmp_path, "garbled")
    state, notes = ckpt.find_resume_state(tmp_path, all_logs_match)
    assert state.step == 10
    assert len(notes) == 1 and "latest.json is unreadable" in notes[0]
    assert notes[0].endswith("using the newest verified state, resume/step_000010")

    state, notes = ckpt.find_resume_state(tmp_path, lambda s: "logs differ")
    assert state is None
    assert notes[0] == "skipped resume/step_000010: logs differ" and "latest.json is unreadable" in notes[1]


def test_apply_state_refuses_a_sharded_state(tmp_path):
    save(tmp_path, 10)
    state = ckpt.read_state(tmp_path / "resume" / "step_000010")
    state.sharded = True
    model, opt = trained()
    with pytest.raises(ckpt.StateError, match="distributed.strategy=fsdp"):
        ckpt.apply_state(state, model, opt)


def test_rng_states_of_cuda_generators_are_saved_and_restored_where_there_are_some(monkeypatch):
    # No GPU needed: torch.cuda is replaced by recorders, so this checks which generators are touched, not CUDA.
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    rng = ckpt._rng_state()
    assert torch.equal(rng["cpu"], torch.get_rng_state()) and rng["cuda"] == ["gpu0"]
    ckpt._set_rng_state(rng)
    assert restored == [["gpu0"]]

    # A state saved on a GPU machine resumes on a CPU-only one (CUDA is left alone), and one saved on a CPU-only
    # machine on a GPU one (its generators keep their seeds).
    restored.clear()
    ckpt._set_rng_state({"cpu": torch.get_rng_state()})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt._set_rng_state(rng)
    assert restored == [] and "cuda" not in ckpt._rng_state()


# ---------------------------------------------------------------------------------------------- FSDP (sharded)
# The same module functions on one gloo rank: torch.distributed.checkpoint and the commit protocol run exactly as
# under FSDP, minus the other ranks (what several ranks need is tests/test_train_fsdp.py's).
@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


class ForceReadingAdamW(torch.optim.AdamW):
    """AdamW with the one method of InstrumentedAdamW that loading touches, recorded (importing the package costs
    seconds; its forces are tests/test_forces.py's)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.reads: list[bool] = []

    def read_forces(self, reset: bool = True) -> None:
        self.reads.append(reset)


def sharded_model(seed: int = 0) -> tuple[torch.nn.Module, ForceReadingAdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return model, ForceReadingAdamW(model.parameters(), lr=0.1)


def save_sharded(run: Path, step: int, model, opt, keep: str | None = None, extra: dict | None = None) -> str:
    return ckpt.save_resume_sharded(
        run, step, model, opt, config=CONFIG, logs=LOGS, extra=extra or {"step": step}, keep=keep
    )


def test_sharded_state_round_trip(tmp_path, one_rank):
    model, opt = sharded_model()
    at_zero = {k: v.clone() for k, v in model.state_dict().items()}
    name0 = save_sharded(tmp_path, 0, model, opt)
    assert not opt.state  # saving at step 0 must not create Adam state (get_state_dict would take a step)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = 0.05  # as the schedule leaves it
    name = save_sharded(tmp_path, 10, model, opt, keep=name0, extra={"monitor": {"T": 1.5}})
    after_save = torch.rand(4)

    root = tmp_path / "resume"
    directory = root / name
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_000000", "step_000010"]
    assert json.loads((root / "latest.json").read_text()) == dict(step=10, dir=name, sharded=True)
    assert verify_manifest(directory) == [] and "rank0.pt" in read_manifest(directory)["files"]
    assert {k: read_manifest(directory)[k] for k in ("step", "sharded", "world_size")} == dict(
        step=10, sharded=True, world_size=1
    )
    for verify in (True, False):  # sharded by its manifest, and by its rank files where the manifest is not read
        state = ckpt.read_state(directory, verify=verify)
        assert (state.step, state.sharded, state.optimizer, state.weights) == (10, True, None, None)
        assert (state.config, state.logs, state.extra) == (CONFIG, LOGS, {"monitor": {"T": 1.5}})

    fresh, fresh_opt = sharded_model(seed=1)
    torch.manual_seed(99)
    assert ckpt.load_sharded(directory, fresh, fresh_opt) == {"monitor": {"T": 1.5}}
    assert torch.equal(torch.rand(4), after_save)
    assert fresh_opt.reads == [True]  # the lr-0 step get_state_dict took to create the state is read and dropped
    assert fresh_opt.param_groups[0]["lr"] == 0.05
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        assert all(torch.equal(fresh_opt.state[p][k], opt.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    fresh, fresh_opt = sharded_model(seed=2)  # a step-0 state: the weights, and still no Adam state
    assert ckpt.load_sharded(root / name0, fresh, fresh_opt) == {"step": 0}
    assert all(torch.equal(v, at_zero[k]) for k, v in fresh.state_dict().items())
    assert not fresh_opt.state and fresh_opt.reads == []

    save_sharded(tmp_path, 20, model, opt, keep=name)
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_000010", "step_000020"]


def test_sharded_protocol_commits_once_every_rank_has_written(tmp_path, one_rank, events, monkeypatch):
    tmp, final = "run/resume/step_000000.tmp", "run/resume/step_000000"
    real_barrier = one_rank.barrier

    def barrier():  # what the other ranks would find when they pass it: does the .tmp exist, is our rank file in it
        events.append(("barrier", (tmp_path / tmp).is_dir(), (tmp_path / tmp / "rank0.pt").is_file()))
        real_barrier()

    monkeypatch.setattr(one_rank, "barrier", barrier)
    (tmp_path / tmp).mkdir(parents=True)
    (tmp_path / tmp / "rank0.pt").write_bytes(b"a leftover of a killed save")
    events.clear()
    model, opt = sharded_model()
    save_sharded(tmp_path / "run", 0, model, opt)
    assert [e for e in events if e[0] != "replace" or e[1] == tmp] == [
        ("remove", tmp),  # rank 0 clears the leftover and makes an empty .tmp ...
        ("barrier", True, False),  # ... before any rank writes into it
        ("barrier", True, True),  # every rank's shards and rank file are written before rank 0 checksums them
        ("write_manifest", tmp),
        ("fault", "resume.written", 0),
        ("remove", final),
        ("replace", tmp, final),
        ("fsync_dir", "run/resume"),
        ("fault", "resume.renamed", 0),
        ("write_durably", "run/resume/latest.json"),
        ("fault", "resume.pointer", 0),
        ("fsync_dir", "run/resume"),
        ("barrier", False, False),  # no rank goes on before the state is committed
    ]
    assert verify_manifest(tmp_path / final) == []


def test_sharded_save_creates_resume_dir_durably(tmp_path, one_rank, events):
    save_sharded(tmp_path / "run", 0, *sharded_model())
    assert events[:2] == [("fsync_dir", "."), ("fsync_dir", "run")]  # run/, then run/resume/, each made durable


def test_load_sharded_refuses_a_single_process_state_and_nonfinite_weights(tmp_path, one_rank):
    save(tmp_path / "single", 10)
    model, opt = sharded_model()
    with pytest.raises(ckpt.StateError, match="single-process state"):
        ckpt.load_sharded(tmp_path / "single" / "resume" / "step_000010", model, opt)

    with torch.no_grad():
        model[1].bias[0] = float("nan")
    save_sharded(tmp_path, 10, model, opt)
    with pytest.raises(ckpt.StateError, match="NaN or Inf"):
        ckpt.load_sharded(tmp_path / "resume" / "step_000010", *sharded_model(seed=1))


def other_rank_says(dist, monkeypatch, finite: bool) -> None:
    """Stand in for a second rank in the all-reduce: its shard is finite or not (MIN over ranks is the verdict)."""

    def all_reduce(tensor, op):
        assert op == dist.ReduceOp.MIN
        tensor.clamp_(max=float(finite))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def test_load_sharded_refuses_when_another_ranks_shard_is_nonfinite(tmp_path, one_rank, monkeypatch):
    model, opt = sharded_model()
    save_sharded(tmp_path, 10, model, opt)
    other_rank_says(one_rank, monkeypatch, finite=False)  # every rank must refuse, or the others would go on alone
    with pytest.raises(ckpt.StateError, match="NaN or Inf"):
        ckpt.load_sharded(tmp_path / "resume" / "step_000010", *sharded_model(seed=1))


def test_load_sharded_reads_rank_files_with_weights_only(tmp_path, one_rank):
    model, opt = sharded_model()
    save_sharded(tmp_path, 10, model, opt)
    rank_file = tmp_path / "resume" / "step_000010" / "rank0.pt"
    local = torch.load(rank_file, weights_only=True)
    torch.save(dict(local, extra=NotAllowed()), rank_file)  # a crafted file: loading must not build the object
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_sharded(rank_file.parent, *sharded_model(seed=1))


def test_all_finite_agrees_across_ranks(one_rank, monkeypatch):
    assert ckpt.all_finite([torch.ones(3), torch.arange(2)], distributed=True)
    assert not ckpt.all_finite([torch.ones(3), torch.tensor([float("nan")])], distributed=True)
    assert ckpt.all_finite([], distributed=True)
    other_rank_says(one_rank, monkeypatch, finite=True)
    assert not ckpt.all_finite([torch.tensor([float("inf")])], distributed=True)
    other_rank_says(one_rank, monkeypatch, finite=False)
    assert not ckpt.all_finite([torch.ones(3)], distributed=True)
