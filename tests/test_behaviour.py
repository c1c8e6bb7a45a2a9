"""Drop-in behaviour: names, intervals, state dicts, schedulers, GradScaler, bad input, options."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import make_params, param_groups, set_grads, twin_optimizers

from instrumented_adamw import LAST_KEYS, QUANTITIES, InstrumentedAdamW


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()


def test_named_parameters_keep_names_and_plain_params_get_stable_names():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = InstrumentedAdamW(model.named_parameters())
    assert opt.tracked_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    plain = InstrumentedAdamW([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}])
    assert plain.tracked_names == ["group0.param0", "group0.param1", "group1.param0", "group1.param1"]


def test_last_forces_contract():
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.05))
    run(opt, params, 3)
    d = opt.last_forces().to_dict()
    assert set(d) == set(params)
    for row in d.values():
        assert set(row) == set(LAST_KEYS)
        assert all(isinstance(v, float) for v in row.values())
        assert row["inject"] >= 0 and row["decay"] <= 0
        assert row["align"] == pytest.approx(-2 * row["lr"] * row["w_dot_u"])
        assert row["decay"] == pytest.approx(-2 * row["lr"] * row["weight_decay"] * row["w_sq"])
    assert d["enc.weight"]["lr"] == 1e-2 and d["dec.weight"]["weight_decay"] == pytest.approx(0.1)


def test_interval_sums_equal_sum_of_steps_and_reset_is_clean():
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.01))
    per_step = []
    for s in range(7):
        set_grads(params, s)
        opt.step()
        per_step.append(opt.last_forces().last[:, : len(QUANTITIES)].copy())
    r = opt.read_forces(reset=True)
    np.testing.assert_allclose(r.interval, np.sum(per_step, axis=0), rtol=1e-12)
    assert (r.steps == 7).all() and (r.nonfinite_steps == 0).all()
    # Reading again right away: empty interval, last step kept.
    r2 = opt.read_forces()
    assert (r2.steps == 0).all() and not r2.interval.any()
    np.testing.assert_array_equal(r2.last, r.last)
    # The next interval starts from zero.
    set_grads(params, 7)
    opt.step()
    r3 = opt.read_forces()
    np.testing.assert_allclose(r3.interval, r3.last[:, : len(QUANTITIES)], rtol=0)
    assert (r3.steps == 1).all()


def test_interval_residual_closes_over_many_steps():
    params = make_params(torch.float64)
    opt = InstrumentedAdamW(param_groups(params, 0.1))
    opt.read_forces()
    run(opt, params, 25)
    r = opt.read_forces()
    budget = np.abs(r.interval[:, 3:7]).sum(axis=1)
    assert (np.abs(r.residual) <= 1e-9 * budget).all()


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_state_dict_round_trip_both_ways(flags):
    pa, ref, pb, ours = twin_optimizers(flags)
    run(ref, pa, 5)
    run(ours, pb, 5)
    # torch -> ours
    pc = make_params()
    for a, c in zip(pa.values(), pc.values(), strict=True):
        c.data.copy_(a.data)
    loaded = InstrumentedAdamW(param_groups(pc, 0.01), **flags)
    loaded.load_state_dict(copy.deepcopy(ref.state_dict()))  # as if saved to disk
    run(ref, pa, 5, start=5)
    run(loaded, pc, 5, start=5)
    for a, c in zip(pa.values(), pc.values(), strict=True):
        assert torch.equal(a, c)
    assert (loaded.read_forces().steps == 5).all()
    # ours -> torch
    pd = make_params()
    for b, d in zip(pb.values(), pd.values(), strict=True):
        d.data.copy_(b.data)
    back = torch.optim.AdamW(param_groups(pd, 0.01, named=False), **flags)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    run(ours, pb, 5, start=5)
    run(back, pd, 5, start=5)
    for b, d in zip(pb.values(), pd.values(), strict=True):
        assert torch.equal(b, d)
    assert set(ours.state_dict()["state"][0]) == set(ref.state_dict()["state"][0])


def test_lr_scheduler_drives_the_forces():
    pa, ref, pb, ours = twin_optimizers({"foreach": False})
    sched_ref = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    sched = torch.optim.lr_scheduler.LambdaLR(ours, lambda s: 1.0 / (1 + s))
    for s in range(6):
        set_grads(pa, s)
        set_grads(pb, s)
        ref.step()
        ours.step()
        last = ours.last_forces().to_dict()["enc.weight"]
        assert last["lr"] == pytest.approx(1e-2 / (1 + s))
        sched_ref.step()
        sched.step()
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_steps_record_nothing(fused):
    def make(cls, **kw):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        return model, cls(model.parameters(), lr=1e-2, fused=fused, **kw)

    m_ref, o_ref = make(torch.optim.AdamW)
    m, opt = make(InstrumentedAdamW)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    x = torch.randn(8, 16)
    for step in range(4):
        for model, o, scaler in ((m_ref, o_ref, scalers[0]), (m, opt, scalers[1])):
            o.zero_grad()
            loss = model(x).pow(2).mean()
            if step == 2:
                loss = loss * float("inf")  # overflow: GradScaler must skip this step
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    for a, b in zip(m_ref.parameters(), m.parameters(), strict=True):
        assert torch.equal(a, b)
    r = opt.read_forces()
    assert (r.steps == 3).all(), r.steps  # 4 calls, one skipped
    assert (r.nonfinite_steps == 0).all()
    assert np.isfinite(r.interval).all()


def test_nonfinite_gradients_step_like_torch_and_are_marked():
    pa, ref, pb, ours = twin_optimizers({"foreach": False})
    run(ref, pa, 3)
    run(ours, pb, 3)
    for params in (pa, pb):
        set_grads(params, 3)
        params["enc.bias"].grad[0] = float("nan")
    ref.step()
    ours.step()
    for a, b in zip(pa.values(), pb.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    r = ours.read_forces()
    i = r.index("enc.bias")
    assert r.nonfinite_steps[i] == 1 and r.steps[i] == 3 and not r.last_finite[i]
    assert math.isnan(r.to_dict()["enc.bias"]["w_dot_u"])
    assert np.isfinite(r.interval[i]).all()  # NaN kept out of the integral
    j = r.index("enc.weight")
    assert r.steps[j] == 4 and r.last_finite[j]


def test_sparse_gradients_raise_like_torch():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = InstrumentedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_parameter_in_two_groups_raises_like_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        InstrumentedAdamW([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_zero_size_frozen_and_gradless_params(flags):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(0, 4)), torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(5))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.AdamW(ps, **flags)
    ours = InstrumentedAdamW(qs, **flags)
    for group in (ps, qs):
        group[0].grad = torch.zeros(0, 4)
        group[1].grad = torch.ones(6)  # group[2] gets no gradient (frozen / unused)
    ref.step()
    ours.step()
    for a, b in zip(ps, qs, strict=True):
        assert torch.equal(a, b)
    r = ours.read_forces()
    assert list(r.steps) == [1, 1, 0]
    assert r.last[0, 2] == 0.0 and np.isfinite(r.last[0]).all()  # zero-size: all reductions 0
    assert len(ours.state) == len(ref.state) == 2


def test_complex_params_with_fused_raise_like_torch():
    p, q = (torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64)) for _ in range(2))
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.optim.AdamW([p], fused=True).step()
    with pytest.raises(RuntimeError, match="floating point"):
        InstrumentedAdamW([q], fused=True).step()


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}])
def test_complex_params_reduce_on_real_view(flags):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.complex64))
    q = torch.nn.Parameter(p.detach().clone())
    ref, ours = torch.optim.AdamW([p], lr=1e-2, **flags), InstrumentedAdamW([q], lr=1e-2, **flags)
    for s in range(5):
        g = torch.randn(40, dtype=torch.complex64, generator=torch.Generator().manual_seed(s))
        p.grad, q.grad = g.clone(), g.clone()
        pre = q.detach().clone()
        ref.step()
        ours.step()
        assert torch.equal(p, q)
        last = ours.last_forces().last[0]
        assert last[2] == pytest.approx(pre.abs().pow(2).sum().item(), rel=1e-6)
        actual = (q.detach().abs().double().pow(2).sum() - pre.abs().double().pow(2).sum()).item()
        assert actual == pytest.approx(last[3:7].sum(), abs=2 * 2**-23 * q.abs().pow(2).sum().item())


def test_closure_and_tensor_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    twin = torch.nn.Linear(5, 1)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    ours = InstrumentedAdamW(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    ref = torch.optim.AdamW(twin.parameters(), lr=torch.tensor(0.01), foreach=False)
    losses = {}
    for name, m, o in (("ours", model, ours), ("torch", twin, ref)):

        def closure(m=m, o=o):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        losses[name] = [o.step(closure).item() for _ in range(3)]
    assert losses["ours"] == losses["torch"] and losses["ours"][-1] < losses["ours"][0]
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ours.last_forces().to_dict()["group0.param0"]["lr"] == pytest.approx(0.01)


def test_track_every_and_filter_and_off():
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.01), track_every=3, track_filter=lambda n: "weight" in n)
    assert opt.tracked_names == ["enc.weight", "dec.weight", "norm.weight"]
    run(opt, params, 7)  # calls 1, 4, 7 are measured
    r = opt.read_forces()
    assert (r.steps == 3).all() and (r.unmeasured_steps == 4).all()
    held = make_params()
    before = {n: p.detach().clone() for n, p in held.items()}
    off = InstrumentedAdamW(param_groups(held, 0.01), track=False)
    run(off, held, 2)
    assert all(not torch.equal(before[n], p) for n, p in held.items())  # it stepped the tensors it holds
    r = off.read_forces()
    assert (r.steps == 0).all() and (r.unmeasured_steps == 0).all() and not r.interval.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"track_every": 0}, "track_every"),
        ({"track_every": 1.5}, "track_every"),
        ({"weight_decay_schedule": "cosine"}, "weight_decay_schedule"),
        ({"lr": -1.0}, "learning rate"),
        ({"betas": (1.0, 0.9)}, "beta"),
    ],
)
def test_bad_hyperparameters_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InstrumentedAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_step_runs_torchs_graph_capture_health_check(monkeypatch):
    """torch's AdamW refuses a CUDA/XPU graph capture of step() without capturable=True through this check; on a
    machine without an accelerator it returns at once, so it is made to speak here."""

    def check(self):
        raise RuntimeError(f"capture check ran for {type(self).__name__}")

    monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", check)
    for cls in (torch.optim.AdamW, InstrumentedAdamW):
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        with pytest.raises(RuntimeError, match=f"capture check ran for {cls.__name__}"):
            cls([p]).step()
        assert (p == 0).all()  # before anything moved


def test_capturable_on_cpu_raises_like_torch():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    p.grad = q.grad = torch.ones(3)
    with pytest.raises(Exception) as torch_err:
        torch.optim.AdamW([p], capturable=True).step()
    with pytest.raises(type(torch_err.value), match="capturable"):
        InstrumentedAdamW([q], capturable=True).step()


def test_differentiable_matches_torch():
    torch.manual_seed(0)
    base = torch.randn(12, requires_grad=True)
    outs = []
    for cls in (torch.optim.AdamW, InstrumentedAdamW):
        p = base.clone()  # non-leaf: differentiable steps update it in place under autograd
        p.retain_grad()
        p.grad = torch.linspace(-1, 1, 12)
        opt = cls([p], lr=0.1, differentiable=True)
        opt.step()
        (p * p).sum().backward()
        outs.append((p.detach().clone(), base.grad.clone()))
        base.grad = None
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _host_reads(opt, params) -> int:
    """Count device-to-host reads (``item``/``cpu``/``tolist``/``numpy``) made by one ``step()``."""
    calls = []
    names = ("item", "cpu", "tolist", "numpy")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def wrapper(self, *a, **k):
            calls.append(name)
            return originals[name](self, *a, **k)

        return wrapper

    set_grads(params, 1)
    for n in names:
        setattr(torch.Tensor, n, counting(n))
    try:
        opt.step()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    return len(calls)


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_step_reads_nothing_back_beyond_what_torch_reads(flags):
    """torch reads its CPU-hosted step counters; tracking must add no read of device data."""
    pa, ref, pb, ours = twin_optimizers(flags)
    for params, opt in ((pa, ref), (pb, ours)):
        set_grads(params, 0)
        opt.step()
    assert _host_reads(ours, pb) == _host_reads(ref, pa)


@pytest.mark.parametrize(
    "flags",
    [{"foreach": False}, {"foreach": True}, {"capturable": True, "foreach": False}, {"capturable": True},
     {"foreach": True, "track_every": 2}, {"foreach": False, "weight_decay_schedule": "lr_squared"}],
)  # fmt: skip
def test_step_never_reads_device_data(monkeypatch, flags):
    """On the meta device every read of tensor data (``item``, ``bool``, ``tolist``, a copy to the host) raises,
    so any host sync hidden in ``step()`` fails here, whatever form it takes. Step counters of the non-capturable
    paths live on the CPU (as in torch), so reading them is not a device read. The capturable path (CUDA graphs)
    keeps everything on the device."""
    import torch.optim.adam as adam_module

    supported = adam_module._get_capturable_supported_devices()
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices", lambda *a, **k: supported + ["meta"])
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in ((300, 7), (7,), ())]
    opt = InstrumentedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], **flags)
    for _ in range(3):
        for p in params:
            p.grad = torch.empty(p.shape, device="meta")
        opt.step()
    with pytest.raises(NotImplementedError, match="meta"):  # the read is the one place that copies to the host
        opt.read_forces()


def test_lr_squared_weight_decay_matches_its_formula_on_every_path():
    """λ_t = λ·η_t/η_max: the update equals torch AdamW given that λ_t, and the decay force uses it."""
    for flags in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        pa, ref, pb, ours = twin_optimizers(flags, weight_decay=0.2, weight_decay_schedule="lr_squared")
        base_wd = [g["weight_decay"] for g in ref.param_groups]
        peaks = [g["lr"] for g in ref.param_groups]
        for s in range(8):
            factor = (s + 1) / 8 if s < 4 else 0.5  # warm up, then drop
            for g_ref, g_ours, wd, peak in zip(ref.param_groups, ours.param_groups, base_wd, peaks, strict=True):
                g_ref["lr"] = g_ours["lr"] = peak * factor
                g_ref["weight_decay"] = wd * (peak * factor) / peak
            set_grads(pa, s)
            set_grads(pb, s)
            ref.step()
            ours.step()
            last = ours.last_forces().to_dict()["dec.weight"]
            lam_t = 0.4 * factor
            assert last["weight_decay"] == pytest.approx(lam_t, rel=1e-15)
            assert last["decay"] == pytest.approx(-2 * last["lr"] * lam_t * last["w_sq"], rel=1e-12)
        for a, b in zip(pa.values(), pb.values(), strict=True):
            assert torch.equal(a, b), flags
    # The default schedule leaves torch's decay untouched.
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.2))
    run(opt, params, 1)
    assert opt.last_forces().to_dict()["dec.weight"]["weight_decay"] == pytest.approx(0.4)


def test_lr_squared_uses_scheduler_initial_lr_as_peak():
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.1), weight_decay_schedule="lr_squared")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25)  # lr = 0.25 * initial_lr from the start
    run(opt, params, 1)
    assert opt.last_forces().to_dict()["enc.weight"]["weight_decay"] == pytest.approx(0.1 * 0.25)
    sched.step()


def test_lr_squared_rejects_tensor_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = InstrumentedAdamW([p], lr=torch.tensor(0.01), fused=True, weight_decay_schedule="lr_squared")
    with pytest.raises(ValueError, match="float learning rates"):
        opt.step()


def test_fused_with_tensor_lr_matches_torch():
    pa, ref, pb, ours = twin_optimizers({"fused": True})
    for opt in (ref, ours):
        for g in opt.param_groups:
            g["lr"] = torch.tensor(g["lr"])
    run(ref, pa, 4)
    run(ours, pb, 4)
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)
    assert ours.last_forces().to_dict()["enc.weight"]["lr"] == pytest.approx(1e-2)


@pytest.mark.parametrize("foreach", [False, True])
def test_capturable_path_matches_torch(monkeypatch, foreach):
    """capturable=True is CUDA-only in torch; letting torch accept CPU exercises our device-side bias corrections
    (step counters as tensors) through the same delegated path CUDA graphs use."""
    import torch.optim.adam as adam_module

    supported = adam_module._get_capturable_supported_devices()
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices", lambda *a, **k: supported + ["cpu"])
    from helpers import reference_reductions

    pa, ref, pb, ours = twin_optimizers({"capturable": True, "foreach": foreach})
    for s in range(6):
        set_grads(pa, s)
        set_grads(pb, s)
        pre = {n: p.detach().clone() for n, p in pb.items()}
        ref.step()
        ours.step()
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)
    last = ours.last_forces().to_dict()["enc.weight"]
    _, uu, ww = reference_reductions(pre["enc.weight"], ours.state[pb["enc.weight"]], 0.9, 0.999, 1e-8, False)
    assert last["u_sq"] == pytest.approx(uu, rel=1e-6) and last["w_sq"] == pytest.approx(ww, rel=1e-6)


def test_parameters_swapped_in_behind_the_optimizer_are_refused_not_read_as_zeros():
    """DeepSpeed ZeRO-1/2 replace the groups' tensors with flat partitions: an unknown tensor must stop the step (and
    the monitor's renaming) with what works, never train on with every force reading zero."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = InstrumentedAdamW([("w", w)], lr=1e-2)
    w.grad = torch.ones(4, 4)
    opt.step()
    flat = torch.nn.Parameter(torch.zeros(16))
    flat.grad = torch.ones(16)
    opt.param_groups[0]["params"] = [flat]  # as DeepSpeed's ZeRO optimizer wrapper does
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] holds 1 tensor.*\(16,\).*DeepSpeed ZeRO.*track=False"):
        opt.step()
    assert torch.equal(flat, torch.zeros(16))  # refused before anything moved
    with pytest.raises(RuntimeError, match="replaced after construction"):  # the HF callback names from the model
        opt.name_parameters([("model.w", w)], only_unnamed=False)
    plain = InstrumentedAdamW([("w", w)], lr=1e-2, track=False)
    plain.param_groups[0]["params"] = [flat]
    plain.step()  # untracked: plain AdamW, nothing to attribute
    assert not torch.equal(flat, torch.zeros(16))


def test_repeated_names_are_disambiguated_with_a_warning_never_dropped():
    """torch accepts two groups of named_parameters() with the same names; every tensor keeps its own entry."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"'weight' is already another tensor's; this one is reported as 'weight#1'"):
        opt = InstrumentedAdamW([{"params": list(m[0].named_parameters())}, {"params": list(m[1].named_parameters())}])
    assert opt.tracked_names == ["weight", "bias", "weight#1", "bias#1"]
    m(torch.randn(5, 3)).sum().backward()
    before = float(m[1].weight.detach().double().square().sum())
    opt.step()
    r = opt.read_forces()
    assert sorted(r.to_dict()) == sorted(r.interval_dict()) == ["bias", "bias#1", "weight", "weight#1"]
    assert r.to_dict()["weight#1"]["w_sq"] == pytest.approx(before, rel=1e-6)  # the second Linear's, pre-update


def test_parameters_rewrapped_in_their_places_keep_their_names_and_are_measured():
    """accelerate's FSDP2 prepare swaps each parameter of the groups for its DTensor, in place: same shapes in the
    same places are the same parameters, adopted under their names (nothing refused, nothing read as zero)."""
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    opt = InstrumentedAdamW([("lin.weight", w), ("lin.bias", b)], lr=1e-2, weight_decay=0.1)
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt.param_groups[0]["params"] = [w2, b2]
    w2.grad, b2.grad = torch.ones(4, 3), torch.ones(4)
    before = float(w2.detach().double().square().sum())
    opt.step()
    last = opt.last_forces().to_dict()
    assert opt.tracked_names == ["lin.weight", "lin.bias"]
    assert last["lin.weight"]["w_sq"] == pytest.approx(before, rel=1e-6) and last["lin.weight"]["align"] != 0
