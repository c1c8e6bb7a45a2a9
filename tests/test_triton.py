"""The fused Triton kernel, run on CPU with TRITON_INTERPRET=1 (on CUDA it compiles for real: tests/test_cuda.py).

Bitwise: the update against a float emulation of torch's fused CUDA AdamW (tests/torch_fused_cuda.py: fp32
arithmetic read from torch 2.13's SASS, exact FMAs) for fp32 / fp16 / bf16 × amsgrad × maximize × weight decay, and
120 steps with GradScaler; bf16 stores as Triton's interpreter makes them (toward zero; GPUs and torch round to
nearest even). Bounds: reductions within 1e-5 relative of a float64 reference with β in fp32 (as the kernel takes
them) for ‖û‖² and ‖W‖², 1e-5 of √(‖W‖²‖û‖²) for ⟨W,û⟩; after 30 fp32 steps parameters within 1e-5 of float64 and
of torch's CPU fused AdamW (which rounds otherwise). Two runs, and misaligned views against aligned tensors (the
kernel's element-by-element path against its 16-byte one, same arithmetic): bitwise equal. What the GPU compiler
makes of both paths is checked in tests/test_kernel_ptx.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it where there is no GPU
    pytest.skip(
        "a CUDA device is present, so Triton compiles for it: the kernel is tested there by tests/test_cuda.py "
        "(these CPU-interpreter tests need TRITON_INTERPRET=1 before triton is first imported)",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from helpers import (  # noqa: E402
    assert_kernel_record_is_host_record,
    make_params,
    param_groups,
    reference_reductions,
    set_grads,
)

from instrumented_adamw import InstrumentedAdamW  # noqa: E402
from instrumented_adamw.kernels.triton_adamw import fused_adamw_reduce  # noqa: E402
from instrumented_adamw.optim.functional import StackedReductions  # noqa: E402

# Against BLOCK = 1024: full blocks only; a tail of 8 (16 bytes in bf16); tails that are a multiple of 16 bytes in
# fp32 but not in bf16 (1500) or in neither (4810, 5); one element; empty. Aligned tensors take the kernel's 16-byte
# path wherever the block allows it, the rest goes element by element.
SHAPES = [(2048,), (1032,), (37, 130), (5,), (1,), (1500,), (0,)]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view one element into a larger buffer: 2 or 4 bytes off every 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and (view.data_ptr() % 16 or not t.numel())  # an empty tensor has no address
    return view


def tensors(dtype, seed=0, misalign=()):
    """Params, exp_avg, exp_avg_sq, max_exp_avg_sq; the lists named in ``misalign`` (0-3) hold misaligned views."""
    g = torch.Generator().manual_seed(seed)
    params = [(0.02 * torch.randn(s, generator=g)).to(dtype) for s in SHAPES]
    lists = [params] + [[torch.zeros_like(p) for p in params] for _ in range(3)]
    return tuple([misaligned(t) for t in ts] if i in misalign else ts for i, ts in enumerate(lists))


def reference_step(p, g, m, v, vmax, step, lr, wd, b1, b2, eps, amsgrad, maximize):
    """float64 AdamW step (torch's formula) and the reductions on the pre-update W."""
    g = -g if maximize else g
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    vh = torch.maximum(vmax, v, out=vmax) if amsgrad else v
    u = (m / (1 - b1**step)) / ((vh / (1 - b2**step)).sqrt() + eps)
    red = ((p * u).sum(), (u * u).sum(), (p * p).sum())
    p.mul_(1 - lr * wd).sub_(lr * u)
    return [float(r) for r in red]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_kernel_matches_float64_reference(amsgrad, maximize, dtype=torch.float32):
    lr, wd, b1, b2, eps = 3e-3, 0.1, 0.9, 0.999, 1e-8
    B1, B2 = (float(torch.tensor(b, dtype=torch.float32)) for b in (b1, b2))
    ps, ms, vs, vmaxs = tensors(dtype)
    ref = [[t.double() for t in ts] for ts in (ps, ms, vs, vmaxs)]
    torch_ps = [torch.nn.Parameter(p.clone()) for p in ps]
    torch_opt = torch.optim.AdamW(torch_ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=amsgrad,
                                  maximize=maximize, fused=True)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    plan = None
    steps = 30
    for step in range(1, steps + 1):
        grads = [(p.float() * 0.5 + 0.05 * torch.randn(p.shape, generator=gen)).to(dtype) for p in ps]
        for tp, g in zip(torch_ps, grads, strict=True):
            tp.grad = g.clone()
        torch_opt.step()
        # Every step: the kernel's reductions against float64 ones computed from the kernel's own state before
        # the step (its fp32 trajectory), so the check does not fade as the float64 trajectory drifts apart.
        own = [[t.double() for t in ts] for ts in (ps, ms, vs, vmaxs)]
        out, plan = fused_adamw_reduce(ps, grads, ms, vs, vmaxs, torch.full((len(ps),), float(step)), lr=lr,
                                       weight_decay=wd, beta1=b1, beta2=b2, eps=eps, amsgrad=amsgrad,
                                       maximize=maximize, plan=plan)  # fmt: skip
        for i in range(len(ps)):
            reference_step(
                ref[0][i],
                grads[i].double(),
                ref[1][i],
                ref[2][i],
                ref[3][i],
                step,
                lr,
                wd,
                b1,
                b2,
                eps,
                amsgrad,
                maximize,
            )  # fmt: skip  (the independent float64 trajectory, checked at the end)
            # The kernel takes β in fp32, as torch's fused CUDA kernel does (1 − fp32(0.999) is 1.3e-5 off
            # 1 − 0.999): its reductions are held to float64 ones with the same β.
            red = reference_step(own[0][i], grads[i].double(), own[1][i], own[2][i], own[3][i], step, lr, wd, B1,
                                 B2, eps, amsgrad, maximize)  # fmt: skip
            wu, uu, ww = out[i].tolist()
            tol = 1e-5
            assert uu == pytest.approx(red[1], rel=tol, abs=1e-30), (step, i)
            assert ww == pytest.approx(red[2], rel=tol), (step, i)
            assert abs(wu - red[0]) <= tol * math.sqrt(red[1] * red[2]) + 1e-30, (step, i)
    for p, r, tp in zip(ps, ref[0], torch_ps, strict=True):
        if not p.numel():
            continue
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=2e-7)
        torch.testing.assert_close(p, tp.detach(), rtol=1e-5, atol=2e-7)  # and torch's fused AdamW


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bf16_step_within_one_rounding_of_torch_fused(amsgrad):
    # The kernel stores bf16 like torch's fused AdamW: fp32 math, one rounding per stored value. Triton's CPU
    # interpreter rounds fp32 -> bf16 toward zero where GPUs round to nearest even, so here one step may differ
    # from torch by one bf16 ulp per stored value (2^-8 relative); multi-step bf16 parity is a CUDA test.
    ps, ms, vs, vmaxs = tensors(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    grads = [(0.05 * torch.randn(p.shape, generator=g)).to(torch.bfloat16) for p in ps]
    torch_ps = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = torch.optim.AdamW(torch_ps, lr=3e-3, weight_decay=0.1, amsgrad=amsgrad, fused=True)
    for tp, gr in zip(torch_ps, grads, strict=True):
        tp.grad = gr.clone()
    opt.step()
    fused_adamw_reduce(ps, grads, ms, vs, vmaxs, torch.ones(len(ps)), lr=3e-3, weight_decay=0.1, beta1=0.9,
                       beta2=0.999, eps=1e-8, amsgrad=amsgrad, maximize=False)  # fmt: skip
    ulp = 2.0**-7  # bf16 spacing relative to the value, at its coarsest
    for p, m, v, tp in zip(ps, ms, vs, torch_ps, strict=True):
        if p.numel():
            st = opt.state[tp]
            torch.testing.assert_close(p.float(), tp.detach().float(), rtol=2 * ulp, atol=0)
            torch.testing.assert_close(m.float(), st["exp_avg"].float(), rtol=ulp, atol=0)
            torch.testing.assert_close(v.float(), st["exp_avg_sq"].float(), rtol=ulp, atol=0)


def test_two_runs_are_bitwise_identical_and_found_inf_skips():
    outs = []
    for _ in range(2):
        ps, ms, vs, vmaxs = tensors(torch.float32)
        grads = [torch.ones_like(p) * 0.01 for p in ps]
        out, _ = fused_adamw_reduce(ps, grads, ms, vs, vmaxs, torch.ones(len(ps)), lr=1e-3, weight_decay=0.01,
                                    beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
        outs.append((out, [p.clone() for p in ps]))
    assert torch.equal(outs[0][0], outs[1][0]) and all(
        torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True)
    )
    ps, ms, vs, vmaxs = tensors(torch.float32)
    before = [p.clone() for p in ps]
    out, _ = fused_adamw_reduce(ps, [torch.ones_like(p) for p in ps], ms, vs, vmaxs, torch.ones(len(ps)), lr=1e-3,
                                weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, maximize=False,
                                grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([1.0]))  # fmt: skip
    assert (
        all(torch.equal(a, b) for a, b in zip(before, ps, strict=True))
        and not out.any()
        and not any(m.any() for m in ms)
    )


def run_steps(ps, ms, vs, vmaxs, grads, steps=2, maximize=False, **kw):
    """A few fused steps (amsgrad, so that every stream moves); returns the last reductions."""
    plan = out = None
    for step in range(1, steps + 1):
        # With GradScaler the kernel writes the unscaled gradients back (as torch's): scaled ones every step.
        step_grads = [g.clone() for g in grads] if kw.get("grad_scale") is not None else grads
        out, plan = fused_adamw_reduce(ps, step_grads, ms, vs, vmaxs, torch.full((len(ps),), float(step)), lr=3e-3,
                                       weight_decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True,
                                       maximize=maximize, plan=plan, **kw)  # fmt: skip
    return out


def bitwise_equal(lists_a, lists_b) -> bool:
    return all(torch.equal(a, b) for xs, ys in zip(lists_a, lists_b, strict=True) for a, b in zip(xs, ys, strict=True))


def make_grads(ps, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(p.float() * 0.5 + 0.05 * torch.randn(p.shape, generator=g)).to(p.dtype) for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["params", "grads", "moments", "every_other_tensor"])
def test_misaligned_tensors_give_the_aligned_result(dtype, where):
    # The kernel decides per tensor: all streams 16-byte aligned (and a block whose mask is constant over 16 bytes)
    # take the vectorised path, the rest the element-by-element one; views off a 16-byte boundary (a slice of a
    # larger buffer) must work and, the arithmetic being the same, give the same bits as aligned tensors.
    ps, ms, vs, vmaxs = tensors(dtype)
    grads = make_grads(ps)
    out = run_steps(ps, ms, vs, vmaxs, grads)
    lists = tensors(dtype)
    grads_off = make_grads(lists[0])
    if where == "grads":
        grads_off = [misaligned(g) for g in grads_off]
    elif where == "every_other_tensor":  # one bucket, both paths
        lists = tuple([misaligned(t) if i % 2 else t for i, t in enumerate(ts)] for ts in lists)
        grads_off = [misaligned(g) if i % 2 else g for i, g in enumerate(grads_off)]
    else:
        lists = tensors(dtype, misalign={"params": (0,), "moments": (1, 2, 3)}[where])
    out_off = run_steps(*lists, grads_off)
    assert torch.equal(out, out_off) and bitwise_equal((ps, ms, vs, vmaxs), lists)


def test_grad_scale_divides_and_a_clear_found_inf_steps():
    # GradScaler: gradients scaled by 2^k and unscaled in the kernel give exactly the unscaled step (division by a
    # power of two is exact); found_inf = 0 lets the step through.
    ps, ms, vs, vmaxs = tensors(torch.float32)
    grads = make_grads(ps)
    out = run_steps(ps, ms, vs, vmaxs, grads)
    scaled = tensors(torch.float32)
    out_scaled = run_steps(*scaled, [g * 1024.0 for g in grads], grad_scale=torch.tensor([1024.0]),
                           found_inf=torch.tensor([0.0]))  # fmt: skip
    assert torch.equal(out, out_scaled) and bitwise_equal((ps, ms, vs, vmaxs), scaled)
    written = [g * 1024.0 for g in grads]
    fused_adamw_reduce(*tensors(torch.float32)[:1], written, *tensors(torch.float32)[1:], torch.ones(len(ps)),
                       lr=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True, maximize=False,
                       grad_scale=torch.tensor([1024.0]))  # fmt: skip
    assert all(torch.equal(w, g) for w, g in zip(written, grads, strict=True)), "unscaled gradients written back"
    with pytest.raises(TypeError, match="grad_scale must be a one-element float32 tensor"):
        run_steps(*scaled, grads, grad_scale=torch.tensor([2.0], dtype=torch.float64))


def test_optimizer_fused_path_uses_the_kernel(monkeypatch):
    # On CUDA fused=True takes this path; on CPU the test routes it there explicitly.
    monkeypatch.setattr(InstrumentedAdamW, "_triton_device", staticmethod(lambda device: True))
    params, ref_params = make_params(), make_params()
    ours = InstrumentedAdamW(param_groups(params, 0.01), fused=True)
    ref = torch.optim.AdamW(param_groups(ref_params, 0.01, named=False), foreach=False)
    plans = None
    for step in range(20):
        set_grads(params, step)  # new gradient tensors every step, as after zero_grad(set_to_none=True)
        set_grads(ref_params, step)
        pre = {n: p.detach().clone() for n, p in params.items()}
        ours.step()
        ref.step()
        plans = plans or dict(ours._plans)
    # One launch plan per (group, device, dtype), built once: new gradients only refresh their pointer table.
    assert len(plans) == 2 and all(ours._plans[k] is plan for k, plan in plans.items())
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-5, atol=1e-7)
    last = ours.last_forces().to_dict()
    for n, p in params.items():
        # β as the kernel (and torch's fused CUDA AdamW) takes them: in fp32
        wu, uu, ww = reference_reductions(pre[n], ours.state[p], *(float(torch.tensor(b)) for b in (0.9, 0.999)),
                                          1e-8, False)  # fmt: skip
        assert last[n]["u_sq"] == pytest.approx(uu, rel=1e-5) and last[n]["w_sq"] == pytest.approx(ww, rel=1e-5)
        assert abs(last[n]["w_dot_u"] - wu) <= 1e-5 * math.sqrt(uu * ww)
    assert ours._kernel_launches > 0


@pytest.mark.parametrize("lr", [1e-2, "tensor"])
def test_optimizer_fused_path_mixed_dtypes_and_filtered_rows(monkeypatch, lr):
    """A group holding fp32 and bf16 tensors is two launches (one per dtype bucket), and a ``track_filter`` leaves
    rows out of a bucket: each measured tensor still gets its own reductions, the others none. With a float lr
    the kernel records them into the table itself; a tensor lr brings them back, one stacked record."""
    monkeypatch.setattr(InstrumentedAdamW, "_triton_device", staticmethod(lambda device: True))
    torch.manual_seed(0)
    params = {
        "a.weight": torch.nn.Parameter(torch.randn(33, 17)),
        "b.weight": torch.nn.Parameter(torch.randn(40, 9).bfloat16()),
        "c.weight": torch.nn.Parameter(torch.randn(1500)),
        "d.bias": torch.nn.Parameter(torch.randn(7).bfloat16()),
    }
    lr = torch.tensor(1e-2) if lr == "tensor" else lr
    ours = InstrumentedAdamW(list(params.items()), lr=lr, fused=True, track_filter=lambda n: n != "c.weight")
    c0 = params["c.weight"].detach().clone()
    recorded = []
    real_record = ours._record
    monkeypatch.setattr(ours, "_record", lambda ps, red, *a, **k: recorded.append(red) or real_record(ps, red, *a, **k))
    for step in range(3):
        set_grads(params, step)
        pre = {n: p.detach().clone() for n, p in params.items()}
        ours.step()
    assert ours._kernel_launches == 6 and len(ours._plans) == 2
    if isinstance(lr, float):
        assert recorded == []
    else:  # both buckets in one stacked record, rows in bucket order: fp32 (a), then bf16 (b, d)
        assert len(recorded) == 3 and all(isinstance(r, StackedReductions) for r in recorded)
        assert recorded[-1].positions == [0, 1, 3]
    last = ours.last_forces().to_dict()
    assert sorted(last) == ["a.weight", "b.weight", "d.bias"]
    assert ours.state[params["c.weight"]]["step"].item() == 3 and not torch.equal(params["c.weight"], c0)
    for n in last:
        p = params[n]
        _, uu, ww = reference_reductions(pre[n], ours.state[p], 0.9, 0.999, 1e-8, False)
        rel = 1e-5 if p.dtype == torch.float32 else 6e-3  # bf16: û from the fp32 moments before they are stored
        assert last[n]["u_sq"] == pytest.approx(uu, rel=rel) and last[n]["w_sq"] == pytest.approx(ww, rel=1e-5)


def test_kernel_recorded_table_is_bitwise_the_host_record(monkeypatch):
    """The second launch's table update against ``ForceStats.record`` (helpers.assert_kernel_record_is_host_record:
    skips, NaN, track_every, filters, resets, an lr schedule); compiled, on CUDA, in tests/test_cuda.py."""
    monkeypatch.setattr(InstrumentedAdamW, "_triton_device", staticmethod(lambda device: True))
    assert_kernel_record_is_host_record(monkeypatch, "cpu")


def test_optimizer_fused_path_on_dtensor_parameters_records_into_their_rows(monkeypatch, tmp_path):
    """DTensor parameters (FSDP2 on a 1-rank mesh here) on the fused kernel path: the kernel runs on the local
    shards and records into the rows keyed by the DTensors, with the values the plain tensors give."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard

    monkeypatch.setattr(InstrumentedAdamW, "_triton_device", staticmethod(lambda device: True))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = make_params()
        sharded = {n: torch.nn.Parameter(DTensor.from_local(p.detach().clone(), mesh, [Shard(0)] if p.ndim else []))
                   for n, p in make_params().items()}  # fmt: skip
        ours = InstrumentedAdamW(list(sharded.items()), lr=1e-2, fused=True)
        ref = InstrumentedAdamW(list(plain.items()), lr=1e-2, fused=True)
        for step in range(3):
            set_grads(plain, step)
            for n, p in sharded.items():
                p.grad = DTensor.from_local(plain[n].grad.clone(), mesh, p.placements)
            ours.step()
            ref.step()
        got, want = ours.read_forces(), ref.read_forces()
        assert ours._kernel_launches > 0 and list(got.names) == list(want.names)
        assert (got.interval == want.interval).all() and (got.steps == 3).all()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ bitwise torch's fused CUDA AdamW
EMULATED_SHAPES = [(1032,), (37, 130), (5,)]


def emulated_run(dtype, steps, *, amsgrad, maximize, weight_decay, scale=None, lr=3e-3, seed=0):
    """``steps`` steps of the kernel and of the float emulation of torch's fused CUDA AdamW (tests/torch_fused_cuda.py)
    on the same data; every parameter, moment and (with GradScaler) unscaled gradient must agree bitwise."""
    from torch_fused_cuda import adamw_step

    g = torch.Generator().manual_seed(seed)
    ours = [(0.02 * torch.randn(s, generator=g)).to(dtype) for s in EMULATED_SHAPES]
    emul = [p.clone() for p in ours]
    state = {k: ([torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]) for k in "mvx"}
    hyper = dict(lr=lr, beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad,
                 maximize=maximize)  # fmt: skip
    scale_t = None if scale is None else torch.tensor([scale], dtype=torch.float32)
    for step in range(1, steps + 1):
        grads = [(0.05 * torch.randn(p.shape, generator=g) * (scale or 1.0)).to(dtype) for p in ours]
        emul_grads = [x.clone() for x in grads]
        fused_adamw_reduce(ours, grads, state["m"][0], state["v"][0], state["x"][0], torch.full((3,), float(step)),
                           grad_scale=scale_t, **hyper)  # fmt: skip
        for i, p in enumerate(emul):
            adamw_step(p, emul_grads[i], state["m"][1][i], state["v"][1][i], state["x"][1][i], step,
                       grad_scale=scale, bf16_truncates=True, **hyper)  # the interpreter's bf16 store  # fmt: skip
        for name, a, b in [("param", ours, emul), ("exp_avg", *state["m"]), ("exp_avg_sq", *state["v"]),
                           *([("max_exp_avg_sq", *state["x"])] if amsgrad else []),
                           *([("unscaled grad", grads, emul_grads)] if scale else [])]:  # fmt: skip
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y), f"{name} differs at step {step}: {(x.float() - y.float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_is_bitwise_torch_fused_cuda_arithmetic(dtype, amsgrad, maximize, weight_decay):
    emulated_run(dtype, 5, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)


def test_kernel_is_bitwise_torch_fused_cuda_arithmetic_over_120_steps_with_grad_scaler():
    """120 steps (bias corrections from 1 − 0.9 to 1 − 0.9^120, where 0.9^t is far below fp32's resolution of 1)
    with a GradScaler scale: unscaled in the kernel, the unscaled gradient written back. (200 steps on the GPU:
    tests/test_cuda.py.)"""
    emulated_run(torch.float32, 120, amsgrad=False, maximize=False, weight_decay=0.1, scale=1024.0)


def test_probe_finds_a_torch_that_rounds_elsewhere_and_the_optimizer_falls_back(monkeypatch):
    """The probe holds the kernel to torch.optim.AdamW(fused=True) of the device it runs on. On CUDA that is the
    kernel it reproduces; torch's CPU fused AdamW rounds elsewhere (bias corrections in float64), so probing on
    the CPU must find the difference, and the optimizer must then step with torch's own kernel: bitwise it, with
    the reason said once."""
    from instrumented_adamw.kernels import triton_adamw
    from instrumented_adamw.optim import adamw as adamw_module

    reason = triton_adamw.mismatch_with_torch(torch.device("cpu"), torch.float32)
    assert reason is not None and "parameters differ from torch.optim.AdamW(fused=True)'s" in reason
    monkeypatch.setattr(InstrumentedAdamW, "_triton_device", staticmethod(lambda device: True))
    monkeypatch.setattr(InstrumentedAdamW, "_PROBED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(adamw_module, "_WARNED_MISMATCH", set())
    params, ref_params = make_params(), make_params()
    ours = InstrumentedAdamW(param_groups(params, 0.01), fused=True)
    ref = torch.optim.AdamW(param_groups(ref_params, 0.01, named=False), fused=True)
    with pytest.warns(UserWarning, match="single-pass kernel is not used") as caught:
        for step in range(3):
            set_grads(params, step)
            set_grads(ref_params, step)
            ours.step()
            ref.step()
    assert len([w for w in caught if "single-pass kernel" in str(w.message)]) == 1
    assert not ours._plans, "the kernel was never launched"
    for n in params:
        assert torch.equal(params[n], ref_params[n])
    assert set(ours.last_forces().steps) == {3}  # still measured, every step
