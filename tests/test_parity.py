"""InstrumentedAdamW vs torch.optim.AdamW (bitwise) and vs a float64 reference (reductions, identity).

Tolerances, and why:
* parameters and optimizer state: bitwise equal -- the update is the same op sequence as torch's.
* ‖û‖², ‖W‖²: 1e-6 relative. û is formed in fp32 (one division, plus torch's own fp32 denominator), so each
  element carries ~2e-7 relative error; sums of positive terms keep that bound.
* ⟨W,û⟩: 1e-6 of Σ|W_i û_i|, the condition scale of a dot product. This is 1e-6 relative whenever W and û are not
  nearly orthogonal; the test gradients are noise-dominated, which makes them nearly orthogonal on purpose.
* identity, fp32 params: |Δ‖W‖²_actual − Σ forces| ≤ ``fp32_closure_bound`` (the roundings of torch's fp32
  update and of storing W₊, plus the worst case of the fp32 rows of the reductions). The forces cannot see
  that rounding; it is reported as the residual. float64 params remove it and the identity then closes to 1e-9
  of the force budget.
* identity, bf16 params: the read-out's residual equals Δ‖W‖²_actual − Σ forces, and stays within
  ``bf16_residual_bound`` (bf16 storage plus torch's bf16 arithmetic in the update).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import SHAPES, reference_reductions, set_grads, twin_optimizers

from instrumented_adamw.optim.forces import fp32_closure_bound

PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
STEPS = 200
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def bf16_residual_bound(w_next: torch.Tensor, last: np.ndarray) -> float:
    """Storage rounding (½ ulp of each W₊ element, doubled for |2Wδ|) plus bf16 rounding inside torch's update
    (denominator: sqrt, div, add; then addcdiv: ≤ 4 roundings of 2^-8 relative each) acting on the align and
    inject terms."""
    eps = torch.finfo(torch.bfloat16).eps  # 2^-7: one ulp at 1.0
    storage = 2 * eps * w_next.double().pow(2).sum().item()
    update = 4 * eps * (abs(last[3]) + last[4])
    return storage + update


def check_step(ours, params, pre, amsgrad, dtype):
    r = ours.last_forces()
    for name, p in params.items():
        i = r.index(name)
        last = r.last[i]
        wu, uu, ww = reference_reductions(pre[name], ours.state[p], BETA1, BETA2, EPS, amsgrad)
        cond = (pre[name].double().reshape(-1).abs() @ _uhat64(ours.state[p], amsgrad).reshape(-1).abs()).item()
        assert abs(last[0] - wu) <= 1e-6 * cond, (name, last[0], wu)
        assert last[1] == pytest.approx(uu, rel=1e-6), name
        assert last[2] == pytest.approx(ww, rel=1e-6), name
        w_next = p.detach().double()
        actual = (w_next.pow(2).sum() - pre[name].double().pow(2).sum()).item()
        forces = last[3:7].sum()
        budget = np.abs(last[3:7]).sum()
        # The last-step residual is this difference, up to the precision of the step's own ‖W‖² reduction (fp32
        # rows: 1e-6 relative); the interval residual, whose both ends are exact norms, is held tightly below.
        assert r.last_residual[i] == pytest.approx(actual - forces, abs=1e-6 * ww)
        if dtype == torch.float64:
            assert abs(actual - forces) <= 1e-9 * budget
        elif dtype == torch.float32:
            w_next_sq = w_next.pow(2).sum().item()
            assert abs(actual - forces) <= fp32_closure_bound(ww, w_next_sq, uu, last[8], last[9]), name
        else:
            assert abs(actual - forces) <= bf16_residual_bound(p.detach(), last), name


def _uhat64(state, amsgrad):
    m = state["exp_avg"].double()
    v = (state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]).double()
    s = float(state["step"])
    return (m / (1 - BETA1**s)) / ((v / (1 - BETA2**s)).sqrt() + EPS)


def assert_same_state(ref, ours, pa, pb):
    for (n, a), b in zip(pa.items(), pb.values(), strict=True):
        assert torch.equal(a, b), f"parameter {n} differs from torch.optim.AdamW"
        sa, sb = ref.state[a], ours.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"state {k} of {n} differs"


CASES = list(itertools.product(PATHS, [False, True], [False, True], [0.0, 0.01, 0.2], [torch.float32, torch.bfloat16]))


@pytest.mark.parametrize(("path", "amsgrad", "maximize", "weight_decay", "dtype"), CASES)
def test_bitwise_equal_to_torch_and_reductions_match_float64(path, amsgrad, maximize, weight_decay, dtype):
    flags = dict(PATHS[path], amsgrad=amsgrad, maximize=maximize)
    pa, ref, pb, ours = twin_optimizers(flags, dtype, weight_decay)
    for step in range(STEPS):
        set_grads(pa, step)
        set_grads(pb, step)
        pre = {n: p.detach().clone() for n, p in pb.items()}
        ref.step()
        ours.step()
        if step % 10 == 0 or step == STEPS - 1:
            check_step(ours, pb, pre, amsgrad, dtype)
    assert_same_state(ref, ours, pa, pb)
    # Every step was integrated for every tensor.
    assert (ours.read_forces().steps == STEPS).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_identity_closes_every_step(path):
    """Every tensor, every step: fp32 within storage rounding, float64 to 1e-9 of the budget."""
    for dtype in (torch.float32, torch.float64):
        _, _, pb, ours = twin_optimizers(dict(PATHS[path]), dtype, 0.1)
        for step in range(60):
            set_grads(pb, step)
            pre = {n: p.detach().clone() for n, p in pb.items()}
            ours.step()
            check_step(ours, pb, pre, False, dtype)


@pytest.mark.parametrize("path", list(PATHS))
def test_interval_residual_is_the_exact_rounding_of_the_interval(path):
    """Interval books open and close on exact (float64) norms of the stored weights, so the residual equals
    ‖W‖²_end − ‖W‖²_start − Σ forces computed independently, to float64 precision: for fp32 parameters it is the
    storage rounding, non-zero and within Σ fp32_closure_bound; a residual reported as 0 would fail."""
    _, _, pb, ours = twin_optimizers(dict(PATHS[path]), torch.float32, 0.1)
    for step in range(10):
        set_grads(pb, step)
        ours.step()
    start = {n: p.detach().double().pow(2).sum().item() for n, p in pb.items()}
    ours.read_forces(reset=True)
    bounds = dict.fromkeys(pb, 0.0)
    for step in range(10, 30):
        set_grads(pb, step)
        before = {n: p.detach().double().pow(2).sum().item() for n, p in pb.items()}
        ours.step()
        last = ours.last_forces().to_dict()
        for n, p in pb.items():
            after = p.detach().double().pow(2).sum().item()
            bounds[n] += fp32_closure_bound(before[n], after, last[n]["u_sq"], last[n]["lr"], last[n]["weight_decay"])
    r = ours.read_forces()
    for n, p in pb.items():
        i = r.index(n)
        end = p.detach().double().pow(2).sum().item()
        independent = end - start[n] - r.interval[i, 3:7].sum()
        assert r.residual[i] == pytest.approx(independent, rel=1e-9, abs=1e-15 * end), n
        assert 0 < abs(r.residual[i]) <= bounds[n], n


def test_shapes_cover_row_tail_and_tiny_tensor():
    from instrumented_adamw.kernels.reductions import ROW

    sizes = [int(np.prod(s)) for s in SHAPES.values()]
    assert any(n % ROW and n > ROW for n in sizes) and any(n < ROW for n in sizes)


def test_read_norms_are_float64_sums_of_squares_for_every_dtype():
    """The read-out's ‖W‖² (one multi-tensor norm per device) against sums of float64 squares: ~1e-12 relative
    for fp32, bf16 and float64 tensors of any shape, zero for an empty one."""
    from instrumented_adamw.kernels.reductions import sq_norms_exact

    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(513, 77, generator=g),
        (torch.randn(40, 9, generator=g) * 1e3).bfloat16(),
        torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 1e-3,
        torch.randn(1, generator=g),
        torch.empty(0),
    ]
    got = sq_norms_exact(tensors)
    want = torch.tensor([t.double().square().sum().item() for t in tensors], dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (5,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_read_norms_of_plain_cpu_tensors_take_the_c_library(monkeypatch):
    """Contiguous float32/float64 CPU tensors (the CPU study's parameters) are summed by the C library's one-read
    reduction, exact float64 products (1e-14 of the float64 sum); a list with any other tensor (a view, bf16)
    keeps torch's float64 norm."""
    from instrumented_adamw.kernels import cpu_adamw
    from instrumented_adamw.kernels.reductions import sq_norms_exact

    lib = cpu_adamw.library()
    assert lib is not None, "the C library did not build here: cpu_adamw.status() says why"
    calls = []
    real = type(lib).reduce3
    monkeypatch.setattr(type(lib), "reduce3", lambda self, w, u, out: calls.append(w.numel()) or real(self, w, u, out))
    g = torch.Generator().manual_seed(4)
    plain = [torch.randn(3000, 41, generator=g), torch.randn(7, generator=g, dtype=torch.float64) * 1e5, torch.empty(0)]
    got = sq_norms_exact(plain)
    want = torch.tensor([t.double().square().sum().item() for t in plain], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert calls == [123000, 7, 0] and got.is_contiguous()
    calls.clear()
    mixed = [plain[0], plain[0].t()]  # a transposed view: not contiguous
    torch.testing.assert_close(sq_norms_exact(mixed), want[[0, 0]], rtol=1e-12, atol=0)
    assert calls == []
