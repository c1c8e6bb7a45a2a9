"""Drop-in fidelity in other people's code: the defects real client code found, one regression test each.

Tensor learning rates of shape [1] / [1, 1] and copies are covered for every database config in
``test_torch_optim_db.py``; here: compiled steps, lr² peaks under every torch scheduler, residuals with
``track_every``, the HF ``Trainer`` callback (resume, log rows, ``report_to``, FSDP ranks), accelerate wrappers,
names from the model, groups added late, reportable run directories, missing extras, the fp32 closure bound.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import make_params, param_groups, set_grads, step_twins
from models import tiny_model
from torch.optim import lr_scheduler as sched

from instrumented_adamw import InstrumentedAdamW, unwrap_optimizer
from instrumented_adamw.kernels import cpu_adamw
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.optim.forces import fp32_closure_bound
from instrumented_adamw.sinks import JsonlSink, read_jsonl

EPS32 = torch.finfo(torch.float32).eps


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()


# ---------------------------------------------------------------------------------------------- compiled step
def test_compiled_step_keeps_every_counter(monkeypatch):
    """torch.compile around opt.step() (as torch documents for its optimizers): track_every, interval steps,
    unmeasured steps and the residual's definedness follow the calls. With default flags on CPU the step is the
    single-pass kernel (Inductor would make two passes): parameters are eager torch fused AdamW's, bitwise."""
    torch._dynamo.reset()
    runs = []
    real_step = cpu_adamw._step
    monkeypatch.setattr(cpu_adamw, "_step", lambda *a: runs.append(1) or real_step(*a))
    pa, pb = make_params(), make_params()
    ref = torch.optim.AdamW(param_groups(pa, 0.1, named=False), fused=True)
    ours = InstrumentedAdamW(param_groups(pb, 0.1), track_every=3)

    @torch.compile(fullgraph=False)
    def compiled_step():
        ours.step()

    step_twins(pa, ref.step, pb, compiled_step, 7)  # calls 1, 4, 7 are measured
    assert int(ours._calls) == 7 and len(runs) == 14  # the kernel, both groups, every call (the mask decides)
    r = ours.read_forces()
    assert list(r.steps) == [3] * 4 and list(r.unmeasured_steps) == [4] * 4
    assert np.isnan(r.residual).all()  # unmeasured steps moved W: the interval cannot close
    assert np.isfinite(r.last_residual).all()  # the last call (7) was measured
    # The next call is unmeasured; its change of W is not in the books, so the last-step residual is undefined.
    set_grads(pb, 7)
    compiled_step()
    r = ours.read_forces()
    assert list(r.steps) == [0] * 4 and list(r.unmeasured_steps) == [1] * 4 and np.isnan(r.last_residual).all()


def test_compiled_default_step_without_the_kernel_is_compiled_torch_and_quiet(monkeypatch):
    """No C compiler (simulated): a compiled step with default flags keeps torch's traced update, bitwise compiled
    torch AdamW, and says nothing (the kernel was not asked for, unlike fused=True)."""
    import warnings

    torch._dynamo.reset()
    cpu_adamw.reset()
    monkeypatch.setenv(cpu_adamw.ENV_SWITCH, "0")
    try:
        pa, pb = make_params(), make_params()
        ref = torch.optim.AdamW(param_groups(pa, 0.1, named=False))
        ours = InstrumentedAdamW(param_groups(pb, 0.1))
        ref_step, our_step = torch.compile(ref.step), torch.compile(ours.step)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*single-pass kernel.*")
            step_twins(pa, ref_step, pb, our_step, 2)
        assert list(ours.read_forces().steps) == [2] * 4
    finally:
        cpu_adamw.reset()
        torch._dynamo.reset()


def test_cpu_steps_reuse_their_scratch_buffers():
    """Eager CPU steps keep their intermediates between steps (a fresh parameter-sized temporary costs its page
    faults every step: the reason the foreach path beats torch's), and reuse the same memory the next step."""
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.1))
    set_grads(params, 0)
    opt.step()
    kept = {key: buf.data_ptr() for key, buf in opt._arena._buffers.items()}
    assert kept, "the CPU step kept no buffer"
    set_grads(params, 1)
    opt.step()
    assert {key: buf.data_ptr() for key, buf in opt._arena._buffers.items()} == kept


def test_uhat_is_written_into_the_kept_buffer_when_given_one():
    from instrumented_adamw.optim.functional import _uhat_raw

    m, v = torch.randn(5, 7), torch.rand(5, 7) + 0.1
    denom = v.sqrt().add_(1e-8)
    buf = torch.empty(5, 7)
    assert _uhat_raw(m, denom, v, 1.0, 1e-8, out=buf) is buf
    assert torch.equal(buf, m / denom) and torch.equal(_uhat_raw(m, denom, v, 1.0, 1e-8), m / denom)


def test_compiled_step_with_foreach_false_is_compiled_torch_bitwise(monkeypatch):
    """foreach=False (or no C compiler) keeps torch's traced update: bitwise compiled torch AdamW, no kernel."""
    torch._dynamo.reset()
    monkeypatch.setattr(cpu_adamw, "_step", lambda *a: pytest.fail("foreach=False must not take the kernel"))
    pa, pb = make_params(), make_params()
    ref = torch.optim.AdamW(param_groups(pa, 0.1, named=False), foreach=False)
    ours = InstrumentedAdamW(param_groups(pb, 0.1), foreach=False)
    step_twins(pa, torch.compile(ref.step), pb, torch.compile(ours.step), 3)
    assert list(ours.read_forces().steps) == [3] * 4


# ---------------------------------------------------------------------------------------------- residual
def test_residual_is_undefined_where_unmeasured_steps_moved_w():
    params = make_params(torch.float64)
    opt = InstrumentedAdamW(param_groups(params, 0.1), track_every=2)
    opt.read_forces()
    run(opt, params, 6)  # calls 1, 3, 5 measured; 2, 4, 6 not
    r = opt.read_forces()
    assert list(r.steps) == [3] * 4 and list(r.unmeasured_steps) == [3] * 4
    assert np.isnan(r.residual).all() and np.isnan(r.last_residual).all()
    every = InstrumentedAdamW(param_groups(params, 0.1))
    every.read_forces()
    run(every, params, 6)
    r = every.read_forces()
    budget = np.abs(r.interval[:, 3:7]).sum(axis=1)
    assert (r.unmeasured_steps == 0).all() and (np.abs(r.residual) <= 1e-9 * budget).all()


def test_monitor_reports_no_residual_over_unmeasured_steps(tmp_path):
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, track_every=2)
    monitor = ForceMonitor(opt, model, [JsonlSink(tmp_path)], log_every=4)
    for s in range(8):
        ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(s + 1)
    rec = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert rec["Transmission/rel_residual"] is None  # JSON null: undefined, not a misleading number
    forces = read_jsonl(tmp_path / "forces.jsonl")[-1]
    assert forces["classes"]["Transmission"]["unmeasured_steps"] == 2


# ---------------------------------------------------------------------------------------------- lr² peaks
def _schedules():
    """(name, scheduler factory, true peak multiplier of the base lr or None if the schedule exceeds the base)."""
    return [
        ("LambdaLR", lambda o: sched.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4)), 1.0),
        ("MultiplicativeLR", lambda o: sched.MultiplicativeLR(o, lambda s: 0.9), 1.0),
        ("StepLR", lambda o: sched.StepLR(o, step_size=3, gamma=0.5), 1.0),
        ("MultiStepLR", lambda o: sched.MultiStepLR(o, milestones=[2, 5], gamma=0.5), 1.0),
        ("ConstantLR", lambda o: sched.ConstantLR(o, factor=0.5, total_iters=4), 1.0),
        ("LinearLR", lambda o: sched.LinearLR(o, start_factor=0.1, total_iters=5), 1.0),
        ("ExponentialLR", lambda o: sched.ExponentialLR(o, gamma=0.8), 1.0),
        ("PolynomialLR", lambda o: sched.PolynomialLR(o, total_iters=8, power=2.0), 1.0),
        ("CosineAnnealingLR", lambda o: sched.CosineAnnealingLR(o, T_max=8), 1.0),
        ("CosineAnnealingWarmRestarts", lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3), 1.0),
        ("SequentialLR", lambda o: sched.SequentialLR(o, [sched.LinearLR(o, start_factor=0.2, total_iters=3),
                                                          sched.CosineAnnealingLR(o, T_max=6)], milestones=[3]), 1.0),
        ("ChainedScheduler", lambda o: sched.ChainedScheduler([sched.ConstantLR(o, factor=0.5, total_iters=2),
                                                               sched.ExponentialLR(o, gamma=0.9)]), 1.0),
        ("ReduceLROnPlateau", lambda o: sched.ReduceLROnPlateau(o, patience=0), 1.0),
        ("OneCycleLR", lambda o: sched.OneCycleLR(o, max_lr=0.05, total_steps=10), "max_lr"),
        ("CyclicLR", lambda o: sched.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3), None),
        ("ExponentialLR growing", lambda o: sched.ExponentialLR(o, gamma=1.2), None),
    ]  # fmt: skip


def _drive(make_sched, lr_peak=None, steps=10):
    """lr² decay under a torch scheduler: the (lr, weight decay) of each step as the optimizer applied them."""
    p = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    opt = InstrumentedAdamW([p], lr=0.01, weight_decay=0.1, weight_decay_schedule="lr_squared", lr_peak=lr_peak)
    s = make_sched(opt)
    seen = []
    for i in range(steps):
        p.grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        opt.step()
        last = opt.last_forces().to_dict()["group0.param0"]
        seen.append((last["lr"], last["weight_decay"]))
        s.step(1.0) if isinstance(s, sched.ReduceLROnPlateau) else s.step()
    return opt, seen


@pytest.mark.parametrize(("name", "make", "peak"), _schedules(), ids=[s[0] for s in _schedules()])
def test_lr_squared_finds_the_true_peak_or_refuses(name, make, peak):
    if peak is None:  # the schedule rises above its base lr and keeps its maximum to itself
        with pytest.raises(ValueError, match="lr_peak"):
            _drive(make)
        probe = [lr for lr, _ in _drive(make, lr_peak=1e9)[1]]  # learn the schedule's lrs with a loose peak
        true_peak = max(probe)
        _, seen = _drive(make, lr_peak=true_peak)
    else:
        opt, seen = _drive(make)
        true_peak = 0.05 if peak == "max_lr" else 0.01
        assert opt.peak_lr(0)[0] == pytest.approx(true_peak)
    for lr, wd in seen:
        assert wd == pytest.approx(0.1 * lr / true_peak, rel=1e-12), name
        assert wd <= 0.1 * (1 + 1e-9)


def test_lr_squared_explicit_peak_and_bad_values():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = InstrumentedAdamW([{"params": [p], "lr_peak": 0.02}], lr=0.01, weight_decay=0.1,
                            weight_decay_schedule="lr_squared")  # fmt: skip
    assert opt.peak_lr(0) == (0.02, "lr_peak")
    for bad in (0.0, -1.0, float("inf"), float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="lr_peak"):
            InstrumentedAdamW([torch.nn.Parameter(torch.zeros(2))], lr_peak=bad)


# ---------------------------------------------------------------------------------------------- HF Trainer
def _trainer(tmp_path, model=None, **kw):
    from transformers import Trainer, TrainingArguments

    from instrumented_adamw.hf import ForceMonitorCallback

    model = model or tiny_model("gpt_neox")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (96, 16), generator=g)]
    args_kw = dict(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, logging_steps=5, report_to=[],
        save_strategy="steps", save_steps=10, use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
        weight_decay=0.05, lr_scheduler_type="cosine", seed=0, data_seed=0,
    )  # fmt: skip
    opt_kw = kw.pop("optimizer_cls_and_kwargs", None)
    args_kw.update(kw)
    if opt_kw is None:
        opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.05)
        extra = dict(optimizers=(opt, None))
    else:
        extra = dict(optimizer_cls_and_kwargs=opt_kw)
    args = TrainingArguments(**args_kw)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[ForceMonitorCallback()], **extra)


def _callback(trainer):
    from instrumented_adamw.hf import ForceMonitorCallback

    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ForceMonitorCallback))


def test_hf_force_metrics_join_log_history_and_metrics_jsonl_has_loss_and_lr(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(0 < r["Transmission/align_share"] < 1 for r in rows)
    metrics = read_jsonl(tmp_path / "forces" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    for m, r in zip(metrics, rows, strict=True):
        assert m["loss"] == r["loss"] and m["lr"] == r["learning_rate"]
        assert m["Transmission/align_share"] == r["Transmission/align_share"]


def test_hf_logs_are_synced_to_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """Records are flushed per log and fsync'd before each Trainer save (after the step's record is written), so a
    checkpoint never points past what is on disk; the run's end syncs once more."""
    from instrumented_adamw.sinks import JsonlSink

    seen = []
    real_sync = JsonlSink.sync

    def sync(self):
        steps = [r["step"] for r in read_jsonl(self.path("metrics"))] if self.path("metrics").exists() else []
        run_dir = self.directory.parent  # the sink writes <output_dir>/forces
        seen.append((steps[-1] if steps else None, sorted(p.name for p in run_dir.glob("checkpoint-*"))))
        real_sync(self)

    monkeypatch.setattr(JsonlSink, "sync", sync)
    _trainer(tmp_path).train()
    before_save = [entry for entry in seen if f"checkpoint-{entry[0]}" not in entry[1]]
    assert before_save == [(10, []), (20, ["checkpoint-10"])]  # each save's step logged, synced, then saved
    assert seen[-1] == (20, ["checkpoint-10", "checkpoint-20"])  # on_save and close
    # Saves on steps the monitor does not log (every 7 steps, logs every 5): synced before each all the same.
    seen.clear()
    _trainer(tmp_path / "off_beat", save_steps=7).train()
    assert (5, []) in seen  # before checkpoint-7 (records up to step 5)
    assert (10, ["checkpoint-7"]) in seen  # before checkpoint-14


def test_hf_report_to_integrations_receive_the_force_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tmp_path, report_to=["tensorboard"], save_strategy="no")
    trainer.train()
    events = [p for p in tmp_path.rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/Transmission/align_share" in tags, tags
    assert [e.step for e in acc.Scalars("train/Transmission/align_share")] == [5, 10, 15, 20]


def test_hf_resume_from_checkpoint_continues_t_over_tau(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.train()
    want = read_jsonl(tmp_path / "a" / "forces" / "metrics.jsonl")
    resumed = _trainer(tmp_path / "a")  # same output dir: the checkpoint at step 10 is there
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    got = read_jsonl(tmp_path / "a" / "forces" / "metrics.jsonl")
    assert [m["step"] for m in got] == [5, 10, 15, 20]  # records after the checkpoint replaced, none duplicated
    for key in ("Transmission/t_over_tau", "Other/t_over_tau"):
        assert got[1][key] == want[1][key]  # kept from before the resume point
        assert got[-1][key] == pytest.approx(want[-1][key], rel=1e-12)  # and continued from it, not from 0


def test_hf_optimizer_built_by_the_trainer_is_named_from_the_model(tmp_path):
    trainer = _trainer(tmp_path, optimizer_cls_and_kwargs=(InstrumentedAdamW, {"lr": 1e-3}), save_strategy="no")
    trainer.train()
    tensors = read_jsonl(tmp_path / "forces" / "forces.jsonl")[-1]["tensors"]
    assert "gpt_neox.layers.0.mlp.dense_4h_to_h.weight" in tensors
    assert not any(t["cls"] == "unclassified" for t in tensors.values())


def test_hf_every_rank_reads_only_the_main_one_writes(tmp_path):
    """Under FSDP2 read_forces is a collective: ranks other than 0 must read too, and write nothing."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from instrumented_adamw.hf import ForceMonitorCallback

    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters())
    reads = []
    real = opt.read_forces
    opt.read_forces = lambda reset=True: reads.append(reset) or real(reset)
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=5, report_to=[], use_cpu=True)
    state = TrainerState(is_world_process_zero=False, stateful_callbacks=[])
    cb = ForceMonitorCallback()
    with pytest.warns(UserWarning, match="report_to"):  # called directly: no CallbackHandler to reorder
        cb.on_train_begin(args, state, TrainerControl(), model=model, optimizer=opt)
    state.global_step = 5
    cb.on_step_end(args, state, TrainerControl(should_log=True))
    cb.on_log(args, state, TrainerControl(), logs={"loss": 1.0})
    cb.on_train_end(args, state, TrainerControl())
    assert reads == [True, True]  # the monitor opening its books, then the log step: both on this rank too
    assert not (tmp_path / "forces").exists()


# ---------------------------------------------------------------------------------------------- wrappers, names
def test_accelerate_wrapper_is_unwrapped():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters())
    model, wrapped = Accelerator(cpu=True).prepare(model, opt)
    assert isinstance(wrapped, AcceleratedOptimizer) and unwrap_optimizer(wrapped) is opt
    monitor = ForceMonitor(wrapped, model)
    assert monitor.optimizer is opt and monitor.names == opt.tracked_names
    ids = torch.randint(0, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    wrapped.step()
    assert (unwrap_optimizer(wrapped).read_forces().steps == 1).all()


def test_monitor_names_unnamed_tensors_from_the_model_or_names():
    model = tiny_model("llama")
    plain = InstrumentedAdamW(model.parameters())
    assert plain.has_unnamed_parameters and plain.tracked_names[0] == "group0.param0"
    monitor = ForceMonitor(plain, model)
    assert not plain.has_unnamed_parameters
    assert monitor.names == [n for n, _ in model.named_parameters()]
    assert monitor.roles["model.layers.0.mlp.down_proj.weight"].cls == "Transmission"
    other = InstrumentedAdamW(model.parameters())
    ForceMonitor(other, names=model.named_parameters(), model_type="llama")
    assert other.tracked_names == monitor.names
    with pytest.warns(UserWarning, match="model= or names="):
        ForceMonitor(InstrumentedAdamW(model.parameters()))


def test_name_parameters_reapplies_the_filter_and_keeps_measured_values():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = InstrumentedAdamW(model.parameters(), track_filter=lambda n: "bias" not in n)
    assert len(opt.tracked_names) == 4  # generic names all pass the filter
    x = torch.randn(5, 4)
    model(x).sum().backward()
    opt.step()
    before = opt.last_forces().to_dict()["group0.param0"]
    opt.name_parameters(model)
    assert opt.tracked_names == ["0.weight", "1.weight"]
    assert opt.last_forces().to_dict()["0.weight"] == before


def test_monitor_picks_up_groups_added_later(tmp_path):
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    opt = InstrumentedAdamW(a.named_parameters())
    monitor = ForceMonitor(opt, sinks=[JsonlSink(tmp_path)], log_every=1)
    opt.add_param_group({"params": list(b.parameters()), "param_names": ["b.weight", "b.bias"]})
    for step in (1, 2):
        b(a(torch.randn(5, 4))).sum().backward()
        opt.step()
        monitor.step(step)
    tensors = read_jsonl(tmp_path / "forces.jsonl")[-1]["tensors"]
    assert set(tensors) == {"weight", "bias", "b.weight", "b.bias"}
    assert tensors["b.weight"]["steps"] == 1


# ---------------------------------------------------------------------------------------------- run dirs, extras
def _user_loop(run_dir, steps=20):
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.parameters(), lr=2e-3)
    monitor = ForceMonitor(opt, model, [JsonlSink(run_dir)], log_every=5, weibull_every=10)
    monitor.fit(0)
    for s in range(steps):
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(s))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(s + 1, loss=loss.item(), lr=2e-3)
    monitor.close()


@pytest.mark.parametrize("source", ["user_loop", "hf_callback"])
def test_every_directory_our_sinks_write_is_reportable(tmp_path, source):
    from instrumented_adamw.cli import main

    if source == "user_loop":
        run_dir = tmp_path / "myrun"
        _user_loop(run_dir)
    else:
        _trainer(tmp_path / "hf", save_strategy="no").train()
        run_dir = tmp_path / "hf" / "forces"
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    name = "myrun" if source == "user_loop" else "hf"
    assert f"forces_{name}.png" in pngs and "align_share.png" in pngs
    assert all((tmp_path / "report" / p).stat().st_size > 10_000 for p in pngs)
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("module", ["matplotlib", "yaml"])
def test_missing_extra_names_what_to_install(tmp_path, monkeypatch, capsys, module):
    from instrumented_adamw.cli import main

    run_dir = tmp_path / "myrun"
    _user_loop(run_dir, steps=5)
    (run_dir / "config.yaml").write_text("optim: {lr: 0.002}\n")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"'{module}'" in err and "pip install 'instrumented-adamw[plot]'" in err


# ---------------------------------------------------------------------------------------------- fp32 closure bound
def test_fp32_bound_holds_when_a_tensor_collapses_in_one_step():
    """β1 = β2 = 0 makes û = g/(|g|+ε) = ±1, so W₊ = (1−ηλ)W − ηû nearly cancels when |W| = η/(1−ηλ): a bound
    proportional to ‖W₊‖² (the old README's 2·ε₃₂·‖W₊‖²) fails there; ``fp32_closure_bound`` holds."""
    lr, wd = 0.25, 0.1
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (4096,), generator=g).float() * 2 - 1
    w0 = (lr / (1 - lr * wd)) * sign * (1 + 1e-6 * torch.randn(4096, generator=g))
    p = torch.nn.Parameter(w0.clone())
    p.grad = sign.clone()
    opt = InstrumentedAdamW([p], lr=lr, betas=(0.0, 0.0), eps=1e-12, weight_decay=wd, foreach=False)
    opt.step()
    last = opt.last_forces().to_dict()["group0.param0"]
    actual = p.detach().double().pow(2).sum().item() - w0.double().pow(2).sum().item()
    residual = abs(actual - (last["align"] + last["inject"] + last["decay"] + last["higher_order"]))
    w_next_sq = p.detach().double().pow(2).sum().item()
    assert w_next_sq < 1e-6 * last["w_sq"]  # it collapsed
    assert residual > 2 * EPS32 * w_next_sq  # the old statement is not a bound
    assert residual <= fp32_closure_bound(last["w_sq"], w_next_sq, last["u_sq"], lr, wd)


def test_fit_without_safetensors_names_the_extra(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from instrumented_adamw.cli import main

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "w.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main(["fit", str(tmp_path / "w.safetensors")]) == 2
    assert "pip install 'instrumented-adamw[checkpoints]'" in capsys.readouterr().err


def test_state_dict_carries_the_track_every_phase():
    """A resumed optimizer measures the calls an uninterrupted one would (track_every counts calls)."""
    straight_params = make_params()
    straight = InstrumentedAdamW(param_groups(straight_params, 0.1), track_every=3)
    run(straight, straight_params, 7)  # calls 1, 4, 7 measured
    first_params = make_params()
    first = InstrumentedAdamW(param_groups(first_params, 0.1), track_every=3)
    run(first, first_params, 4)
    saved = first.state_dict()
    assert saved["param_groups"][0]["track_calls"] == 4
    ref = torch.optim.AdamW(param_groups(make_params(), 0.1, named=False))
    ref.load_state_dict(saved)  # torch's AdamW accepts it and carries the key along
    resumed = InstrumentedAdamW(param_groups(first_params, 0.1), track_every=3)
    resumed.load_state_dict(ref.state_dict())
    assert [g["track_calls"] for g in resumed.param_groups] == [4] * len(resumed.param_groups)  # as loaded
    resumed.read_forces()
    run(resumed, first_params, 3, start=4)  # calls 5, 6, 7: only 7 is measured
    r = resumed.read_forces()
    assert list(r.steps) == [1] * 4 and list(r.unmeasured_steps) == [2] * 4
    np.testing.assert_array_equal(r.last, straight.read_forces().last)


@pytest.mark.parametrize(
    "hyper",
    [{"lr": torch.tensor(1e-2)}, {"lr": torch.tensor([1e-2])}, {"betas": (torch.tensor(0.9), torch.tensor(0.99))}],
    ids=["0-d lr", "[1] lr", "tensor betas"],
)
def test_tensor_hyperparameters_with_default_flags_are_torchs_update_bitwise(hyper):
    """torch's default CPU step takes tensor lr and betas (its multi-tensor one refuses a tensor lr): ours must too,
    with the same bits, and measure the steps."""

    def run(cls):
        w = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
        opt = cls([w], **{"lr": 1e-2, **hyper})
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            w.grad = torch.randn(w.shape, generator=g)
            opt.step()
        return w.detach(), opt

    (ref, _), (ours, opt) = run(torch.optim.AdamW), run(InstrumentedAdamW)
    assert torch.equal(ref, ours)
    assert list(opt.read_forces().steps) == [3]


def test_hf_warns_when_the_trainer_overrode_the_kwargs_weight_decay(tmp_path):
    """optimizer_cls_and_kwargs=(InstrumentedAdamW, {"weight_decay": 0.01}) with the default
    TrainingArguments.weight_decay=0 trains without decay: said once, naming the argument that fixes it."""
    trainer = _trainer(tmp_path, optimizer_cls_and_kwargs=(InstrumentedAdamW, {"lr": 1e-3, "weight_decay": 0.01}),
                       weight_decay=0.0, save_strategy="no", max_steps=5)  # fmt: skip
    expected = (r"weight_decay=0.01, but every parameter group has weight decay 0: .* TrainingArguments.weight_decay "
                r"\(0 here\).*TrainingArguments\(weight_decay=0.01\)")  # fmt: skip
    with pytest.warns(UserWarning, match=expected) as seen:
        trainer.train()
    assert sum("every parameter group has weight decay 0" in str(w.message) for w in seen) == 1
    decay = read_jsonl(tmp_path / "forces" / "metrics.jsonl")[-1]["Transmission/decay_share"]
    assert decay == 0.0
