"""The single-pass CPU kernel behind ``fused=True`` on CPU (``instrumented_adamw/kernels/cpu_adamw.c`` + ``.py``).

Bounds, and why:
* parameters, moments and AMSGrad maxima: bitwise equal to torch's fused CPU AdamW. The kernel reproduces torch's
  rounding (its variants are found by probes against torch's own kernel), so nothing less is accepted. Sizes cover
  torch's scalar tail (every remainder modulo 16), several of the kernel's 8192-element work items, one element and
  an empty tensor.
* reductions: û = m/d in the parameter's dtype (d = torch's own denominator), products and sums in float64. ‖û‖² and
  ‖W‖² (sums of positive terms) carry the relative error of û: within 1e-6 of a float64 reference for float32 (one
  rounding of 2^-24 per element, plus the reference's own û from the same stored moments), 1e-12 for float64;
  ⟨W,û⟩ within the same fraction of Σ|W·û|, its condition scale.
* the reductions do not depend on the thread count (partial sums per work item, added in a fixed order): bitwise.
* ``reductions.reduce3`` (⟨W,u⟩, ‖u‖², ‖W‖² of a given u, InstrumentedMuon's O) on contiguous CPU tensors of one
  dtype takes the library's one-read reduction: float products are exact in float64, so within 1e-13 of Σ|terms|
  (float64 summation of ≤ 3·8192 terms per block); other tensors, or no library, take torch ops, within their
  worst-case bound ``forces.GAMMA_ROW`` (fp32 rows of 128 products) of Σ|terms|.
* without a compiler (simulated: ``$CC`` missing or failing, or none on ``$PATH``), or when the probes find torch
  rounding otherwise, the kernel reports why and ``fused=True`` takes the two-pass path: a one-time warning, the
  same parameters bitwise, reductions as above.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import make_params, param_groups, set_grads, step_twins

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.kernels import cpu_adamw

SIZES = [4096, 1, 7, 15, 16, 17, 33, 100, 3 * 8192 + 5, 0]
BETA2, EPS = 0.999, 1e-8
# (lr, β1, weight decay, amsgrad, maximize): β1 = 0.3 takes the other branch of torch's lerp (weight 1 − β1 ≥ 0.5).
CONFIGS = [(1e-2, 0.9, 0.1, False, False), (3e-3, 0.3, 0.0, True, True)]


@pytest.fixture
def fresh_kernel():
    """No loaded kernel (the next use builds or loads it again) and no fallback warning given yet; the kernel the
    test broke is forgotten afterwards."""
    cpu_adamw.reset()
    yield
    cpu_adamw.reset()


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in SIZES]
    state = [[torch.zeros_like(t) for t in p] for _ in range(3)]
    grads = [[torch.randn(n, generator=g, dtype=torch.float64).mul(1e-2).to(dtype) for n in SIZES] for _ in range(4)]
    return p, state, grads


def _reference(w, m, v, step, beta1):
    """float64 (⟨W,û⟩, ‖û‖², ‖W‖²) and Σ|W·û| from the pre-step W and the stored post-step moments."""
    w, m, v = w.double(), m.double(), v.double()
    u = (m / (1 - beta1**step)) / ((v / (1 - BETA2**step)).sqrt() + EPS)
    return (w * u).sum().item(), (u * u).sum().item(), (w * w).sum().item(), (w * u).abs().sum().item()


def test_kernel_is_built_here_and_reproduces_torch_for_both_dtypes():
    status = cpu_adamw.status()
    assert status.available, f"the CPU kernel should build on this machine (gcc is installed): {status.reason}"
    assert set(status.rounding) == {"float32", "float64"}
    assert "single-pass C kernel" in str(status)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=["decay", "amsgrad-maximize-large-lerp"])
def test_step_is_torch_fused_bitwise_and_reductions_match_float64(dtype, config):
    lr, beta1, wd, amsgrad, maximize = config
    pa, (ma, va, xa), grads = _tensors(dtype)
    pb, mb, vb, xb = [t.clone() for t in pa], [t.clone() for t in ma], [t.clone() for t in va], [t.clone() for t in xa]
    sa, sb = [torch.tensor(0.0) for _ in SIZES], [torch.tensor(0.0) for _ in SIZES]
    tracked = [True] * len(SIZES)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for step, g in enumerate(grads, start=1):
        torch._foreach_add_(sa, 1)
        torch._fused_adamw_(pa, [t.clone() for t in g], ma, va, xa if amsgrad else [], sa, lr=lr, beta1=beta1,
                            beta2=BETA2, weight_decay=wd, eps=EPS, amsgrad=amsgrad, maximize=maximize)  # fmt: skip
        pre = [t.clone() for t in pb]
        red = cpu_adamw.fused_adamw_cpu(pb, g, mb, vb, xb, sb, tracked, amsgrad=amsgrad, beta1=beta1, beta2=BETA2,
                                        lr=lr, weight_decay=wd, eps=EPS, maximize=maximize)  # fmt: skip
        for name, xs, ys in (("param", pa, pb), ("exp_avg", ma, mb), ("exp_avg_sq", va, vb), ("max", xa, xb)):
            for n, x, y in zip(SIZES, xs, ys, strict=True):
                assert torch.equal(x, y), f"{name} of a {n}-element tensor differs from torch after step {step}"
        assert [float(s) for s in sb] == [float(step)] * len(SIZES)
        for i, n in enumerate(SIZES):
            wu, uu, ww, scale = _reference(pre[i], mb[i], xb[i] if amsgrad else vb[i], step, beta1)
            assert abs(red[i, 0].item() - wu) <= tol * scale, (n, step)
            assert red[i, 1].item() == pytest.approx(uu, rel=tol, abs=0.0), (n, step)
            assert red[i, 2].item() == pytest.approx(ww, rel=tol, abs=0.0), (n, step)


def test_mixed_dtypes_untracked_rows_and_thread_count():
    """One call over float32 and float64 tensors (torch groups them by dtype itself); untracked rows are zero; the
    reductions are the same bits with 1 and 2 threads."""
    p32, (m32, v32, _), g32 = _tensors(torch.float32, seed=1)
    p64, (m64, v64, _), g64 = _tensors(torch.float64, seed=2)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            pa = [t.clone() for t in p32 + p64]
            ms, vs = [t.clone() for t in m32 + m64], [t.clone() for t in v32 + v64]
            steps = [torch.tensor(0.0) for _ in pa]
            tracked = [i % 3 != 1 for i in range(len(pa))]
            red = cpu_adamw.fused_adamw_cpu(
                pa, g32[0] + g64[0], ms, vs, [], steps, tracked, amsgrad=False, beta1=0.9, beta2=BETA2, lr=1e-2,
                weight_decay=0.1, eps=EPS, maximize=False,
            )  # fmt: skip
            results.append((red, pa))
    finally:
        torch.set_num_threads(threads)
    (red1, pa1), (red2, pa2) = results
    assert torch.equal(red1, red2) and all(torch.equal(a, b) for a, b in zip(pa1, pa2, strict=True))
    assert (red1[1::3] == 0).all() and (red1[0::3, 2] > 0).any()
    ref = [t.clone() for t in p32 + p64]
    steps = [torch.tensor(1.0) for _ in ref]
    m_ref, v_ref = [t.clone() for t in m32 + m64], [t.clone() for t in v32 + v64]
    for lo, hi in ((0, len(SIZES)), (len(SIZES), 2 * len(SIZES))):
        torch._fused_adamw_(ref[lo:hi], (g32[0] + g64[0])[lo:hi], m_ref[lo:hi], v_ref[lo:hi], [], steps[lo:hi],
                            lr=1e-2, beta1=0.9, beta2=BETA2, weight_decay=0.1, eps=EPS, amsgrad=False,
                            maximize=False)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(ref, pa1, strict=True))


def _reduce3_reference(w, u):
    w, u = w.double().reshape(-1), u.double().reshape(-1)
    exact = [(w * u).sum(), (u * u).sum(), (w * w).sum()]
    scale = [(w * u).abs().sum(), (u * u).sum(), (w * w).sum()]
    return torch.stack(exact), torch.stack(scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduce3_reads_once_in_the_library_matches_float64_and_thread_count(dtype, monkeypatch):
    from instrumented_adamw.kernels import reductions

    lib = cpu_adamw.library()
    assert lib is not None, "the library should build on this machine (gcc is installed)"
    calls = []
    real = lib.reduce3
    monkeypatch.setattr(lib, "reduce3", lambda *a: calls.append(a[0].numel()) or real(*a))
    g = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    for n in SIZES + [8191, 8192, 8193]:
        w = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        u = torch.randn(n, generator=g, dtype=torch.float64).mul(1e-3).to(dtype)
        exact, scale = _reduce3_reference(w, u)
        got = []
        try:
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                got.append(reductions.reduce3(w, u))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(got[0], got[1]), f"{n} elements: the sum depends on the thread count"
        assert ((got[0] - exact).abs() <= 1e-13 * scale).all(), (n, got[0], exact)
        out = torch.full((2, 3), float("nan"), dtype=torch.float64)
        assert reductions.reduce3(w, u, out=out[1]) is not None and torch.equal(out[1], got[0])
        assert out[0].isnan().all()  # only the row asked for is written
    assert len(calls) == 3 * len(SIZES + [8191, 8192, 8193])


def test_reduce3_takes_torch_ops_where_the_library_cannot_read_the_tensors(fresh_kernel, monkeypatch):
    """Transposed, mixed-dtype and bf16 operands, and no library at all: the torch-op path, within its bound."""
    from instrumented_adamw.kernels import reductions
    from instrumented_adamw.optim.forces import GAMMA_ROW

    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 70, generator=g)
    cases = [
        (w, torch.randn(70, 300, generator=g).t()),  # non-contiguous u (Newton-Schulz's O of a tall matrix)
        (w, torch.randn(300, 70, generator=g).to(torch.bfloat16)),  # Muon's O before widening
        (w.to(torch.bfloat16), torch.randn(300, 70, generator=g)),  # bf16 parameters reduce in fp32
    ]
    lib = cpu_adamw.library()
    monkeypatch.setattr(lib, "reduce3", lambda *a: pytest.fail("the library cannot read these tensors"))
    for a, b in cases:
        exact, scale = _reduce3_reference(a.float(), b.float())
        assert ((reductions.reduce3(a, b) - exact).abs() <= GAMMA_ROW * scale).all()
    cpu_adamw.reset()
    monkeypatch.setenv(cpu_adamw.ENV_SWITCH, "0")
    assert cpu_adamw.library() is None
    u = torch.randn(300, 70, generator=g)
    exact, scale = _reduce3_reference(w, u)
    out = torch.empty(3, dtype=torch.float64)
    assert reductions.reduce3(w, u, out=out) is out and ((out - exact).abs() <= GAMMA_ROW * scale).all()


def test_optimizer_takes_the_kernel_and_stays_torch_fused():
    """fused=True on CPU: the kernel's path for tracked steps, torch's own step for unmeasured ones (track_every)
    and for what the kernel does not take (a non-contiguous gradient); always torch's bits."""
    pa, pb = make_params(), make_params()
    ref = torch.optim.AdamW(param_groups(pa, 0.1, named=False), fused=True)
    ours = InstrumentedAdamW(param_groups(pb, 0.1), fused=True, track_every=2, track_filter=lambda n: "bias" not in n)
    paths = []
    real_path = ours._path
    ours._path = lambda *a, **k: paths.append(real_path(*a, **k)) or paths[-1]
    for step in range(6):  # calls 1, 3, 5 measured
        set_grads(pa, step)
        set_grads(pb, step)
        if step == 4:  # a gradient that is a transposed view: torch's fused kernel copies it, ours hands it over
            for params in (pa, pb):
                w = params["dec.weight"]
                w.grad = w.grad.t().contiguous().t()
        ref.step()
        ours.step()
    for (name, a), b in zip(pa.items(), pb.values(), strict=True):
        assert torch.equal(a, b), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref.state[a][key], ours.state[b][key]), (name, key)
    assert paths[:4] == ["cpu", "cpu", "delegated", "delegated"]  # call 1 measured (both groups), call 2 not
    assert paths[8:10] == ["cpu", "delegated"]  # call 5: measured; group 1 has the transposed gradient
    r = ours.read_forces()
    assert r.names == ("enc.weight", "dec.weight", "norm.weight") and list(r.steps) == [3, 3, 3]


@pytest.mark.parametrize("case", ["tensor lr", "tensor betas", "non-contiguous param"])
def test_what_the_kernel_does_not_take_stays_with_torchs_update(case, monkeypatch):
    """The kernel takes contiguous real CPU tensors with float hyperparameters only; the rest is torch's own update
    (its handling of tensor hyperparameters and views), bitwise."""
    monkeypatch.setattr(cpu_adamw, "_step", lambda *a: pytest.fail(f"the kernel must not take a {case}"))
    kwargs = {"fused": True, "lr": 1e-2}
    dtype = torch.float32
    if case == "tensor lr":
        kwargs["lr"] = torch.tensor(1e-2)
    elif case == "tensor betas":
        kwargs["betas"] = (torch.tensor(0.9), torch.tensor(0.99))

    def run(cls):
        base = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
        w = torch.nn.Parameter(base.t() if case == "non-contiguous param" else base)
        opt = cls([w], **kwargs)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            w.grad = torch.randn(w.shape, generator=g, dtype=dtype)
            opt.step()
        return w.detach()

    assert torch.equal(run(torch.optim.AdamW), run(InstrumentedAdamW))


def test_no_compiler_or_a_failing_one_falls_back_with_a_reason(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_adamw.ENV_CACHE, str(tmp_path))  # nothing built: every attempt reaches the compiler
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert "CC=/nonexistent/cc is not an executable" in cpu_adamw.status().reason
    cpu_adamw.reset()
    monkeypatch.setenv("CC", "false")  # runs, exits 1: as a compiler without OpenMP support would
    assert "the C compiler failed" in cpu_adamw.status().reason
    cpu_adamw.reset()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without cc, gcc or clang
    status = cpu_adamw.status()
    assert not status.available and "no C compiler found" in status.reason and "two-pass" in str(status)
    assert not any(tmp_path.iterdir())  # and nothing half-built left behind
    monkeypatch.setenv(cpu_adamw.ENV_SWITCH, "0")
    cpu_adamw.reset()
    assert "disabled by INSTRUMENTED_ADAMW_CPU_KERNEL=0" in cpu_adamw.status().reason


def test_fallback_is_torch_fused_with_correct_forces_and_warns_once(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    pa, pb = make_params(), make_params()
    ref = torch.optim.AdamW(param_groups(pa, 0.1, named=False), fused=True)
    ours = InstrumentedAdamW(param_groups(pb, 0.1), fused=True)
    with pytest.warns(UserWarning, match=r"single-pass kernel is not available \(CC=/nonexistent/cc") as warned:
        for step in range(3):
            set_grads(pa, step)
            set_grads(pb, step)
            pre = {n: p.detach().clone() for n, p in pb.items()}
            ref.step()
            ours.step()
    assert len([w for w in warned if "single-pass kernel" in str(w.message)]) == 1  # once, not every step
    assert all(torch.equal(a, b) for a, b in zip(pa.values(), pb.values(), strict=True))
    last = ours.last_forces().to_dict()
    for name, p in pb.items():
        state = ours.state[p]
        wu, uu, ww, scale = _reference(pre[name], state["exp_avg"], state["exp_avg_sq"], 3.0, 0.9)
        assert abs(last[name]["w_dot_u"] - wu) <= 1e-6 * scale
        assert last[name]["u_sq"] == pytest.approx(uu, rel=1e-6)
        assert last[name]["w_sq"] == pytest.approx(ww, rel=1e-6)


def test_torch_rounding_the_kernel_cannot_match_disables_it(fresh_kernel, monkeypatch):
    """If torch's kernel rounded otherwise (another build), no variant matches the probes: not served, and why."""
    real = torch._fused_adamw_

    def other_rounding(params, *args, **kwargs):
        real(params, *args, **kwargs)
        torch._foreach_mul_(params, 1 + 2**-20)  # a few ulp away from torch's result

    monkeypatch.setattr(torch, "_fused_adamw_", other_rounding)
    status = cpu_adamw.status()
    assert not status.available and "unlike every kernel variant" in status.reason


def test_built_library_is_reused_from_the_cache(fresh_kernel, monkeypatch):
    first = cpu_adamw.status().library
    cpu_adamw.reset()
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert cpu_adamw.status().library == first
    assert calls and all("-shared" not in cmd for cmd in calls)  # asked the compiler its version, built nothing


# ---------------------------------------------------------------------------------------------- torch.compile
def test_compiled_fused_step_calls_the_kernel_and_keeps_every_counter(monkeypatch):
    """torch.compile around opt.step() with fused=True: torch's compiled step calls its eager fused kernel (it is
    compiler-disabled), ours the kernel as an operator inside the graph; bitwise the same every step, counters
    as eager (track_every=3: calls 1, 4, 7 measured)."""
    torch._dynamo.reset()
    runs = []
    real_step = cpu_adamw._step
    monkeypatch.setattr(cpu_adamw, "_step", lambda *a: runs.append(1) or real_step(*a))
    pa, pb = make_params(), make_params()
    ref = torch.optim.AdamW(param_groups(pa, 0.1, named=False), fused=True)
    ours = InstrumentedAdamW(param_groups(pb, 0.1), fused=True, track_every=3)
    step_twins(pa, torch.compile(ref.step), pb, torch.compile(ours.step), 7, every_step=True)
    r = ours.read_forces()
    assert list(r.steps) == [3] * 4 and list(r.unmeasured_steps) == [4] * 4 and int(ours._calls) == 7
    assert len(runs) == 14  # the kernel ran for both groups on every call (compiled, the measured mask decides)


@pytest.mark.parametrize("flags", [{}, {"fused": True}], ids=["default", "fused"])
def test_fullgraph_compile_fails_as_for_torch(flags):
    """torch's optimizers graph-break inside step() by design (torch.optim.optimizer._use_grad_for_differentiable),
    so fullgraph=True around opt.step() raises for torch.optim.AdamW; it must raise the same way for ours."""
    errors = []
    for cls in (torch.optim.AdamW, InstrumentedAdamW):
        torch._dynamo.reset()
        params = make_params()
        opt = cls(param_groups(params, 0.1, named=False), **flags)
        set_grads(params, 0)
        with pytest.raises(torch._dynamo.exc.Unsupported) as err:
            torch.compile(opt.step, fullgraph=True)()
        errors.append(err.value)
    assert str(errors[0]).splitlines()[0] == str(errors[1]).splitlines()[0]


@pytest.mark.parametrize("differentiable", [False, True])
def test_compiled_default_step_takes_the_kernel_unless_differentiable(differentiable, monkeypatch):
    """Under torch.compile with default flags the kernel replaces the traced update; not for a differentiable
    optimizer, whose step autograd must see through (an opaque kernel would cut the graph)."""
    if cpu_adamw.load() is None:
        pytest.fail(f"the CPU kernel did not build here: {cpu_adamw.status()}")
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = InstrumentedAdamW([w], lr=1e-2, differentiable=differentiable)
    local = [[w], [torch.randn(8, 4)], [torch.zeros(8, 4)], [torch.zeros(8, 4)], []]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    path = opt._path(opt.param_groups[0], local, scaled=False, tracking=True)
    assert path == ("delegated" if differentiable else "cpu")


def test_serves_is_marked_constant_for_the_compiler_as_torchs_decorator_marks():
    """cpu_adamw marks ``serves`` as torch.compiler.assume_constant_result would, without importing the compiler at
    start-up: if torch changes how the decorator marks a function, this fails."""

    def probe() -> bool:
        return True

    marked = torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(marked).items()}
    assert added == {"_dynamo_marked_constant": True}
    assert {k: v for k, v in vars(cpu_adamw.serves).items()} == added


def test_importing_the_library_does_not_import_the_compiler_or_dtensor():
    """Start-up: `import instrumented_adamw` costs torch and little more (bench/import_time.py has the figures)."""
    code = "import sys, instrumented_adamw; print(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor', " \
           "'scipy', 'transformers', 'matplotlib', 'triton') if m in sys.modules))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
