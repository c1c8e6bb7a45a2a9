"""InstrumentedMuon: bitwise torch.optim.Muon, forces from the O the update used, the identity, hybrid runs.

Tolerances, and why:
* parameters and momentum buffers: bitwise equal — the update is torch's single-tensor Muon op for op.
* ⟨W,O⟩, ‖O‖², ‖W‖² against float64 from the same O and pre-update W: 1e-6 relative (‖·‖²) and 1e-6 of
  √(‖W‖²‖O‖²) for the inner product — the reductions sum fp32 products in rows of 128.
* the identity with float64 parameters: 1e-9 of the budget (O is bf16, exact in float64; only float64 rounding).
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from models import tiny_model
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from instrumented_adamw import HybridOptimizer, InstrumentedAdamW, InstrumentedMuon, hybrid_param_groups
from instrumented_adamw.monitor import ForceMonitor
from instrumented_adamw.sinks import JsonlSink, read_jsonl

SHAPES = [(48, 32), (32, 96), (64, 64)]


def params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.05 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)) for s in SHAPES]


def grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = (0.3 * p.detach().double() + 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype)


def groups(ps, lr, wd):
    return [{"params": ps[:2], "lr": lr, "weight_decay": wd}, {"params": ps[2:], "lr": lr / 2, "weight_decay": 2 * wd}]


OPTIONS = [
    dict(),
    dict(nesterov=False),
    dict(adjust_lr_fn="original"),
    dict(adjust_lr_fn="match_rms_adamw", momentum=0.9),
    dict(ns_steps=3, eps=1e-6),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) or "defaults" for o in OPTIONS])
def test_bitwise_equal_to_torch_muon_with_state_dicts_and_copies(options, dtype):
    pa, pb = params(dtype), params(dtype)
    ref = torch.optim.Muon(groups(pa, 0.02, 0.1), **options)
    ours = InstrumentedMuon(groups(pb, 0.02, 0.1), **options)
    for step in range(6):
        grads(pa, step)
        grads(pb, step)
        ref.step()
        ours.step()
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(ref.state[a]["momentum_buffer"], ours.state[b]["momentum_buffer"])
    assert (ours.read_forces().steps == 6).all()
    # State dicts both ways, then copies: each continues exactly as torch's Muon does.
    pc, pd = params(dtype), params(dtype)
    for src, dst in ((pa, pc), (pb, pd)):
        for s, d in zip(src, dst, strict=True):
            d.data.copy_(s.data)
    loaded = InstrumentedMuon(groups(pc, 0.02, 0.1), **options)
    loaded.load_state_dict(pickle.loads(pickle.dumps(ref.state_dict())))
    back = torch.optim.Muon(groups(pd, 0.02, 0.1), **options)
    back.load_state_dict(pickle.loads(pickle.dumps(ours.state_dict())))
    clones = [copy.deepcopy((pb, ours)), pickle.loads(pickle.dumps((pb, ours)))]
    for ps, opt in ((pa, ref), (pb, ours), (pc, loaded), (pd, back), *clones):
        for step in range(6, 9):
            grads(ps, step)
            opt.step()
    for ps in (pb, pc, pd, clones[0][0], clones[1][0]):
        for a, b in zip(pa, ps, strict=True):
            assert torch.equal(a, b)


def test_tensor_lr_matches_torch():
    pa, pb = params(), params()
    ref = torch.optim.Muon(pa, lr=torch.tensor([0.02]))
    ours = InstrumentedMuon(pb, lr=torch.tensor([0.02]))
    for step in range(3):
        grads(pa, step)
        grads(pb, step)
        ref.step()
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))
    last = ours.last_forces().to_dict()["group0.param0"]
    assert last["update_lr"] == pytest.approx(0.02 * math.sqrt(48 / 32), rel=1e-6)


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_forces_match_float64_from_the_same_o_and_pre_update_w(adjust):
    ps = params()
    opt = InstrumentedMuon(groups(ps, 0.02, 0.1), adjust_lr_fn=adjust, momentum=0.95)
    bufs = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
    for step in range(8):
        grads(ps, step)
        pre = [p.detach().clone() for p in ps]
        # O as torch's Muon forms it from this step's momentum (a replay on copies of the buffers).
        os_ = []
        for p, buf in zip(ps, bufs, strict=True):
            buf.lerp_(p.grad, 1 - 0.95)
            update = p.grad.lerp(buf, 0.95)
            os_.append(_zeropower_via_newtonschulz(update, (3.4445, -4.7750, 2.0315), 5, 1e-7))
        opt.step()
        r = opt.last_forces()
        for i, (w, o) in enumerate(zip(pre, os_, strict=True)):
            w64, o64 = w.double(), o.double()
            wo, oo, ww = (w64 * o64).sum().item(), (o64 * o64).sum().item(), (w64 * w64).sum().item()
            last = r.last[i]
            assert abs(last[0] - wo) <= 1e-6 * math.sqrt(ww * oo)
            assert last[1] == pytest.approx(oo, rel=1e-6) and last[2] == pytest.approx(ww, rel=1e-6)
            g = 0 if i < 2 else 1
            lr, wd = (0.02, 0.1) if g == 0 else (0.01, 0.2)
            eta_u = _adjust_lr(lr, adjust, w.shape)
            d = r.to_dict()[r.names[i]]
            assert d["update_lr"] == pytest.approx(eta_u, rel=1e-15) and d["lr"] == lr
            assert d["align"] == pytest.approx(-2 * eta_u * last[0], rel=1e-12)
            assert d["inject"] == pytest.approx(eta_u**2 * last[1], rel=1e-12)
            assert d["decay"] == pytest.approx(-2 * lr * wd * last[2], rel=1e-12)


def test_identity_closes_in_float64():
    ps = params(torch.float64)
    opt = InstrumentedMuon(groups(ps, 0.05, 0.3), adjust_lr_fn="match_rms_adamw")
    opt.read_forces()
    for step in range(12):
        grads(ps, step)
        before = [p.detach().clone() for p in ps]
        opt.step()
        last = opt.last_forces()
        for i, (b, p) in enumerate(zip(before, ps, strict=True)):
            actual = (p.detach().pow(2).sum() - b.pow(2).sum()).item()
            forces = last.last[i, 3:7]
            assert abs(actual - forces.sum()) <= 1e-9 * np.abs(forces).sum()
    r = opt.read_forces()
    assert (np.abs(r.residual) <= 1e-9 * np.abs(r.interval[:, 3:7]).sum(axis=1)).all()


def test_lr_squared_under_muon():
    ps = params()
    opt = InstrumentedMuon(ps, lr=0.02, weight_decay=0.2, weight_decay_schedule="lr_squared")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [1.0, 0.5, 0.25][min(s, 2)])
    for step in range(3):
        grads(ps, step)
        opt.step()
        d = opt.last_forces().to_dict()["group0.param0"]
        assert d["weight_decay"] == pytest.approx(0.2 * d["lr"] / 0.02, rel=1e-12)
        sched.step()


def test_track_every_and_residual_bookkeeping_are_shared():
    ps = params(torch.float64)
    opt = InstrumentedMuon(ps, track_every=2)
    for step in range(5):  # calls 1, 3, 5 measured
        grads(ps, step)
        opt.step()
    r = opt.read_forces()
    assert list(r.steps) == [3] * 3 and list(r.unmeasured_steps) == [2] * 3 and np.isnan(r.residual).all()


def test_without_torch_muon_the_error_names_the_version(monkeypatch):
    import instrumented_adamw.optim.muon as M

    monkeypatch.setattr(M, "_TorchMuon", None)
    with pytest.raises(ImportError, match=r"torch>=2\.9"):
        InstrumentedMuon(params())


def test_hybrid_monitor_on_a_tiny_gpt_neox(tmp_path):
    model = tiny_model("gpt_neox")
    muon_params, adamw_params = hybrid_param_groups(model)
    muon_names = {n for n, _ in muon_params}
    assert "gpt_neox.layers.0.mlp.dense_h_to_4h.weight" in muon_names
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in muon_names
    assert not any("embed" in n or "norm" in n or n.endswith(".bias") for n in muon_names)
    hybrid = HybridOptimizer(
        [InstrumentedMuon(muon_params, lr=0.02, adjust_lr_fn="match_rms_adamw"),
         InstrumentedAdamW(adamw_params, lr=1e-3, weight_decay=0.01)]
    )  # fmt: skip
    monitor = ForceMonitor(hybrid, model, [JsonlSink(tmp_path)], log_every=5)
    for step in range(1, 11):
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        hybrid.step()
        hybrid.zero_grad()
        monitor.step(step)
    rec = read_jsonl(tmp_path / "forces.jsonl")[-1]
    tensors = rec["tensors"]
    assert set(tensors) == {n for n, _ in model.named_parameters()}
    for name, t in tensors.items():
        assert t["optimizer"] == ("InstrumentedMuon" if name in muon_names else "InstrumentedAdamW"), name
        assert t["steps"] == 5
    # One budget per class over both optimizers: the class entry sums its tensors whichever optimizer moved them.
    members = [t for t in tensors.values() if t["cls"] == "Transmission"]
    assert rec["classes"]["Transmission"]["align"] == pytest.approx(sum(t["align"] for t in members), rel=1e-12)
    other = [t for t in tensors.values() if t["cls"] == "Other"]
    assert {t["optimizer"] for t in other} == {"InstrumentedAdamW"}
    # The hybrid state dict is optimizer-shaped and round-trips through both optimizers.
    state = pickle.loads(pickle.dumps(hybrid.state_dict()))
    assert set(state) == {"state", "param_groups"} and len(state["state"]) == len(tensors)
    twin = copy.deepcopy(hybrid)
    hybrid.load_state_dict(state)
    for a, b in zip(hybrid.optimizers, twin.optimizers, strict=True):
        assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="not a state dict of this HybridOptimizer"):
        hybrid.load_state_dict({"state": {}, "param_groups": state["param_groups"][:1]})
