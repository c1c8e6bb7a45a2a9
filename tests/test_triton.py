"""The fused Triton kernel, run on CPU with TRITON_INTERPRET=1 (on CUDA it compiles for real: tests/test_cuda.py).

Bounds: parameters and moments within fp32 rounding of torch's AdamW arithmetic (fp32 math in another order, bias
corrections in float64 as torch's), so elements may differ by a few ulp per step; after 30 fp32 steps we assert
1e-5 relative to float64 and to torch's fused AdamW. bf16: one step within one rounding of torch's fused AdamW
(the interpreter rounds bf16 toward zero, GPUs to nearest even). Reductions: 1e-5 relative of a float64 reference
for ‖û‖² and ‖W‖², 1e-5 of √(‖W‖²‖û‖²) for ⟨W,û⟩. Two runs: bitwise equal.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from helpers import make_params, param_groups, reference_reductions, set_grads  # noqa: E402

from instrumented_adamw import InstrumentedAdamW  # noqa: E402
from instrumented_adamw.triton_adamw import fused_adamw_reduce  # noqa: E402

SHAPES = [(37, 130), (5,), (1,), (1500,), (0,)]  # full blocks, tails, one element, empty


def tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [(0.02 * torch.randn(s, generator=g)).to(dtype) for s in SHAPES]
    return (
        params,
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
    )


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
        out, plan = fused_adamw_reduce(ps, grads, ms, vs, vmaxs, torch.full((len(ps),), float(step)), lr=lr,
                                       weight_decay=wd, beta1=b1, beta2=b2, eps=eps, amsgrad=amsgrad,
                                       maximize=maximize, plan=plan)  # fmt: skip
        for i in range(len(ps)):
            red = reference_step(ref[0][i], grads[i].double(), ref[1][i], ref[2][i], ref[3][i], step, lr, wd, b1,
                                 b2, eps, amsgrad, maximize)  # fmt: skip
            if step <= 3:
                # The first steps start from identical states: the reductions match the float64 reference.
                wu, uu, ww = out[i].tolist()
                tol = 1e-5
                assert uu == pytest.approx(red[1], rel=tol, abs=1e-30) and ww == pytest.approx(red[2], rel=tol)
                assert abs(wu - red[0]) <= tol * math.sqrt(red[1] * red[2]) + 1e-30
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
        wu, uu, ww = reference_reductions(pre[n], ours.state[p], 0.9, 0.999, 1e-8, False)
        assert last[n]["u_sq"] == pytest.approx(uu, rel=1e-5) and last[n]["w_sq"] == pytest.approx(ww, rel=1e-5)
        assert abs(last[n]["w_dot_u"] - wu) <= 1e-5 * math.sqrt(uu * ww)
    assert ours._kernel_launches > 0
