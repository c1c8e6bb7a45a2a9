"""InstrumentedAdamW against torch's own optimizer test database (``torch.testing._internal.common_optimizers``).

For every AdamW input configuration the database generates on CPU -- its base configs (default, lr, weight decay,
maximize, amsgrad), each with the implementation flags it lists (foreach, differentiable, fused), in every dtype
we can run (fp32, fp64, bf16, fp16 with the database's own eps override, complex64) -- InstrumentedAdamW must do
exactly what ``torch.optim.AdamW`` does: the same parameters and state bitwise over several steps (or the same
exception where torch refuses the config), state dicts that move both ways, deep copies and pickles that step on
as the original, the one-element tensor learning rates torch accepts, zero and missing gradients. The database's
error inputs must raise the same errors. The harness is ours; the configurations are torch's.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from instrumented_adamw import InstrumentedAdamW

INFO = next(info for info in optim_db if info.optim_cls is torch.optim.AdamW)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
STEPS = 6


def _configs(dtype: torch.dtype) -> list[tuple[str, dict]]:
    """The database's CPU configs for ``dtype``, each with every implementation flag it supports (one at a time)."""
    impls = [f for f in INFO.supported_impls if f != "fused" or "cpu" in INFO.supports_fused_on]
    out = []
    for inp in INFO.optim_inputs_func("cpu", dtype):
        base = dict(copy.deepcopy(inp.kwargs), **dict.fromkeys(impls, False))
        out.append((inp.desc, base))
        out.extend((f"{inp.desc} & {flag}", dict(base, **{flag: True})) for flag in impls)
    return out


CASES = [(dtype, desc, kwargs) for dtype in DTYPES for desc, kwargs in _configs(dtype)]
IDS = [f"{str(d).removeprefix('torch.')}-{desc}" for d, desc, _ in CASES]


def _params(dtype: torch.dtype, differentiable: bool) -> list[torch.Tensor]:
    """A weight, a bias, a scalar and a tensor that never gets a gradient (torch must skip it)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(10, 5), (10,), (), (3,)]
    out = []
    for shape in shapes:
        leaf = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        if differentiable:
            leaf = leaf.clone()  # a non-leaf: differentiable steps update it in place under autograd
            leaf.retain_grad()
        out.append(leaf)
    return out


def _grads(params: list[torch.Tensor], step: int, zero: bool = False) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params[:-1]:
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        p.grad = torch.zeros_like(grad) if zero else grad
    params[-1].grad = None


def _step(opt, params, steps, start=0, zero=False):
    for s in range(start, start + steps):
        _grads(params, s, zero)
        opt.step()


def _build(cls, dtype, kwargs):
    params = _params(dtype, kwargs.get("differentiable", False))
    return params, cls(params, **copy.deepcopy(kwargs))


def _assert_same(pa, oa, pb, ob, what):
    for i, (a, b) in enumerate(zip(pa, pb, strict=True)):
        assert torch.equal(a.detach(), b.detach()), f"{what}: parameter {i} differs from torch.optim.AdamW"
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        assert sa.keys() == sb.keys(), f"{what}: state keys of parameter {i}"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{what}: state {k!r} of parameter {i}"


def _outcome(fn):
    """(result, None) or (None, exception) -- torch's refusal of a config is part of what we must match."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - any exception torch raises, ours must raise too
        return None, exc


def _refused_alike(dtype, kwargs) -> bool:
    """True if torch refuses the config (at construction or first step); then ours must refuse it the same way."""
    ref, err_ref = _outcome(lambda: _build(torch.optim.AdamW, dtype, kwargs))
    if err_ref is None:
        err_ref = _outcome(lambda: _step(ref[1], ref[0], 1))[1]
    if err_ref is None:
        return False
    ours, err_ours = _outcome(lambda: _build(InstrumentedAdamW, dtype, kwargs))
    if err_ours is None:
        err_ours = _outcome(lambda: _step(ours[1], ours[0], 1))[1]
    assert type(err_ours) is type(err_ref) and str(err_ours) == str(err_ref), (err_ref, err_ours)
    return True


@pytest.mark.parametrize(("dtype", "desc", "kwargs"), CASES, ids=IDS)
def test_config_matches_torch(dtype, desc, kwargs):
    ref, err_ref = _outcome(lambda: _build(torch.optim.AdamW, dtype, kwargs))
    ours, err_ours = _outcome(lambda: _build(InstrumentedAdamW, dtype, kwargs))
    if err_ref is not None:
        assert type(err_ours) is type(err_ref), f"torch raised {err_ref!r} at construction, ours {err_ours!r}"
        return
    assert err_ours is None, err_ours
    (pa, oa), (pb, ob) = ref, ours
    _, err_ref = _outcome(lambda: _step(oa, pa, STEPS))
    _, err_ours = _outcome(lambda: _step(ob, pb, STEPS))
    if err_ref is not None:
        assert type(err_ours) is type(err_ref) and str(err_ours) == str(err_ref), (err_ref, err_ours)
        return
    assert err_ours is None, err_ours
    _assert_same(pa, oa, pb, ob, "steps")
    r = ob.read_forces()
    assert list(r.steps) == [STEPS, STEPS, STEPS, 0], "every stepped tensor measured every step, the gradless none"

    # Copies: a deep copy and an unpickled copy step on exactly like the original, with their own force tables.
    # (differentiable steps leave non-leaf parameters, which torch refuses to copy or pickle for any optimizer.)
    copies = [] if kwargs.get("differentiable") else [copy.deepcopy((pb, ob)), pickle.loads(pickle.dumps((pb, ob)))]
    _step(oa, pa, 2, start=STEPS)
    for pc, oc in copies:
        _step(oc, pc, 2, start=STEPS)
        _assert_same(pa, oa, pc, oc, "copy")
        assert list(oc.read_forces().steps) == [2, 2, 2, 0]
    _step(ob, pb, 2, start=STEPS)
    assert list(ob.read_forces().steps) == [2, 2, 2, 0]


_IMPL_FLAGS = ("foreach", "fused", "differentiable")
_BASES = [(i, c) for i, c in zip(IDS, CASES, strict=True) if not any(c[2].get(f) for f in _IMPL_FLAGS)]


@pytest.mark.parametrize(("dtype", "desc", "kwargs"), [c for _, c in _BASES], ids=[i for i, _ in _BASES])
def test_default_flags_match_torch_default(dtype, desc, kwargs):
    """No implementation flag: torch runs its single-tensor AdamW on CPU, ours its multi-tensor one (faster) for
    float32 and float64; the parameters and state must still be torch's, bit for bit, in every dtype."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _IMPL_FLAGS}
    ref, err_ref = _outcome(lambda: _build(torch.optim.AdamW, dtype, kwargs))
    ours, err_ours = _outcome(lambda: _build(InstrumentedAdamW, dtype, kwargs))
    assert type(err_ours) is type(err_ref), (err_ref, err_ours)
    if err_ref is not None:
        return
    (pa, oa), (pb, ob) = ref, ours
    fast = dtype in (torch.float32, torch.float64)
    assert ob._path(ob.param_groups[0], [pb], scaled=False, tracking=True) == ("foreach" if fast else "single")
    _, err_ref = _outcome(lambda: _step(oa, pa, STEPS))
    _, err_ours = _outcome(lambda: _step(ob, pb, STEPS))
    assert type(err_ours) is type(err_ref) and str(err_ours) == str(err_ref), (err_ref, err_ours)
    if err_ref is None:
        _assert_same(pa, oa, pb, ob, "default flags")
        assert list(ob.read_forces().steps) == [STEPS, STEPS, STEPS, 0]


@pytest.mark.parametrize(("dtype", "desc", "kwargs"), [c for c in CASES if not c[2].get("differentiable")], ids=[
    i for i, c in zip(IDS, CASES, strict=True) if not c[2].get("differentiable")])  # fmt: skip
def test_state_dicts_move_both_ways(dtype, desc, kwargs):
    if _refused_alike(dtype, kwargs):
        return
    pa, oa = _build(torch.optim.AdamW, dtype, kwargs)
    pb, ob = _build(InstrumentedAdamW, dtype, kwargs)
    _step(oa, pa, 3)
    _step(ob, pb, 3)
    # torch -> ours and ours -> torch, through a file-like round trip of the state dicts.
    pc, oc = _build(InstrumentedAdamW, dtype, kwargs)
    pd, od = _build(torch.optim.AdamW, dtype, kwargs)
    for src, dst in ((pa, pc), (pb, pd)):
        for s, d in zip(src, dst, strict=True):
            d.data.copy_(s.data)
    oc.load_state_dict(pickle.loads(pickle.dumps(oa.state_dict())))
    od.load_state_dict(pickle.loads(pickle.dumps(ob.state_dict())))
    for p, o in ((pa, oa), (pb, ob), (pc, oc), (pd, od)):
        _step(o, p, 3, start=3)
    _assert_same(pa, oa, pc, oc, "torch -> ours")
    _assert_same(pa, oa, pd, od, "ours -> torch")
    assert list(oc.read_forces().steps) == [3, 3, 3, 0]


LR_SHAPES = [(), (1,), (1, 1)]


@pytest.mark.parametrize("shape", LR_SHAPES, ids=["0d", "1", "1x1"])
@pytest.mark.parametrize(("dtype", "desc", "kwargs"), [c for c in CASES if c[0] == torch.float32], ids=[
    i for i, c in zip(IDS, CASES, strict=True) if c[0] == torch.float32])  # fmt: skip
def test_one_element_tensor_lr(dtype, desc, kwargs, shape):
    lr = kwargs.get("lr", 1e-3)
    kwargs = dict(kwargs, lr=torch.tensor(float(lr)).reshape(shape))
    ref, err_ref = _outcome(lambda: _build(torch.optim.AdamW, dtype, kwargs))
    ours, err_ours = _outcome(lambda: _build(InstrumentedAdamW, dtype, kwargs))
    if err_ref is not None:
        assert type(err_ours) is type(err_ref), (err_ref, err_ours)
        return
    (pa, oa), (pb, ob) = ref, ours
    _, err_ref = _outcome(lambda: _step(oa, pa, 3))
    _, err_ours = _outcome(lambda: _step(ob, pb, 3))
    if err_ref is not None:
        assert type(err_ours) is type(err_ref), (err_ref, err_ours)
        return
    assert err_ours is None, err_ours
    _assert_same(pa, oa, pb, ob, f"lr of shape {shape}")
    last = ob.last_forces().to_dict()["group0.param0"]
    assert last["lr"] == pytest.approx(float(lr), rel=1e-6)
    assert last["align"] == pytest.approx(-2 * last["lr"] * last["w_dot_u"], rel=1e-12)


@pytest.mark.parametrize(("dtype", "desc", "kwargs"), [c for c in CASES if c[0] == torch.float32], ids=[
    i for i, c in zip(IDS, CASES, strict=True) if c[0] == torch.float32])  # fmt: skip
def test_zero_gradients_step_like_torch(dtype, desc, kwargs):
    if _refused_alike(dtype, kwargs):
        return
    (pa, oa), (pb, ob) = _build(torch.optim.AdamW, dtype, kwargs), _build(InstrumentedAdamW, dtype, kwargs)
    _step(oa, pa, 2)
    _step(ob, pb, 2)
    _step(oa, pa, 3, start=2, zero=True)  # zero gradients: moments decay, weights still move and decay
    _step(ob, pb, 3, start=2, zero=True)
    _assert_same(pa, oa, pb, ob, "zero gradients")
    r = ob.read_forces()
    assert list(r.steps) == [5, 5, 5, 0] and (r.nonfinite_steps == 0).all()


ERROR_CASES = [(dtype, e) for dtype in (torch.float32,) for e in INFO.optim_error_inputs_func("cpu", dtype)]


@pytest.mark.parametrize(("dtype", "error"), ERROR_CASES, ids=[e.optimizer_error_input.desc for _, e in ERROR_CASES])
def test_error_inputs_raise_like_torch(dtype, error):
    inp = error.optimizer_error_input

    def make(cls):
        params = inp.params
        if params is None:
            params = [torch.nn.Parameter(torch.randn(2, 3, dtype=dtype))]
        opt = cls(params, **copy.deepcopy(inp.kwargs))
        if error.error_on == OptimizerErrorEnum.STEP_ERROR:
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.step()

    for cls in (torch.optim.AdamW, InstrumentedAdamW):  # torch first: the database describes torch
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                make(cls)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                make(cls)


def _state_dict_inputs():
    from torch.testing._internal.common_optimizers import _get_optim_inputs_including_global_cliquey_kwargs

    return _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, INFO, skip=("differentiable",))


@pytest.mark.parametrize("optim_input", _state_dict_inputs(), ids=lambda i: i.desc)
def test_state_dict_is_deterministic_as_torchs_own_test_checks(optim_input):
    """The procedure of torch's TestOptimRenewed.test_state_dict_deterministic on its AdamW inputs: a state dict
    loaded into a copy steps on identically, the two state dicts are equal, and so are repeated groups' (#36831)."""
    from copy import deepcopy

    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3, generator=g))
    bias = torch.nn.Parameter(torch.randn(2, generator=g))
    x = torch.randn(3, generator=g)

    def closure(opt, w, b):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    optimizer = InstrumentedAdamW([weight, bias], **optim_input.kwargs)
    for _ in range(10):
        optimizer.step(lambda: closure(optimizer, weight, bias))
    with torch.no_grad():
        weight_c, bias_c = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())
    optimizer_c = InstrumentedAdamW([weight_c, bias_c], **optim_input.kwargs)
    optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
    for _ in range(10):
        optimizer.step(lambda: closure(optimizer, weight, bias))
        optimizer_c.step(lambda: closure(optimizer_c, weight_c, bias_c))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    torch.testing.assert_close(optimizer.state_dict(), optimizer_c.state_dict(), rtol=0, atol=0)
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert optimizer.state_dict()["param_groups"][-1] == optimizer_c.state_dict()["param_groups"][-1]
