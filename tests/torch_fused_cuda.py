"""An independent float emulation of torch's fused CUDA AdamW (torch 2.13, sm_90 SASS; docs/torch_fused_adamw.md),
in numpy float32 with an exact single-rounding FMA: what tests/test_triton.py holds the Triton kernel to, bitwise.

Per tensor, from its fp32 step count t: β1, β2, λ, ε and η in fp32 (η a float rounded, or the fp32 lr tensor),
c1 = 1 − pow(β1, t), c2 = √(1 − pow(β2, t)), s = η / c1, ηλ = η·λ. Per element, in fp32:
    g = g / scale (GradScaler; the unscaled g is written back);  g = −g if maximize;  g2 = g·g
    m = fma(m, β1, fma(g, −β1, g));  v = fma(v, β2, fma(g2, −β2, g2));  v̂ = max(vmax, v) with AMSGrad
    W = (λ ≠ 0 ? fma(W, −ηλ, W) : W) − (m·s) / (√v̂ / c2 + ε)
with every division and square root correctly rounded. ``pow`` is torch's (on CUDA the kernel and ``torch.pow``
call the same ``pow_``; here torch's CPU one, which the kernel under TRITON_INTERPRET=1 uses too).
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 a·b + c rounded once. a·b is exact in float64; the float64 sum rounds at most once more, and the result
    then rounds wrongly to fp32 only when that sum lands exactly on an fp32 midpoint: fixed with the sum's exact
    error (TwoSum)."""
    a, b, c = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (a, b, c)))
    prod = a * b
    s = prod + c
    bb = s - c
    err = (prod - bb) + (c - (s - bb))
    r = s.astype(F32)
    r64 = r.astype(np.float64)
    toward = np.where(s > r64, np.inf, -np.inf).astype(F32)
    other = np.nextafter(r, toward)
    tie = (s != r64) & (s == (r64 + other.astype(np.float64)) / 2) & (err != 0)
    # On a tie the exact value lies beyond the midpoint (towards `other`) when the error points away from r.
    beyond = np.sign(err) == np.sign(s - r64)
    return np.where(tie & beyond, other, r).astype(F32)


#: How fp32 values are stored in bf16: to nearest even on a GPU (and in torch); Triton's CPU interpreter, which runs
#: the kernel in the tests, truncates instead. ``adamw_step(..., bf16_truncates=True)`` emulates that store.
def _store(x: np.ndarray, dtype: torch.dtype, bf16_truncates: bool) -> torch.Tensor:
    x = np.ascontiguousarray(x, dtype=F32)
    if dtype == torch.bfloat16 and bf16_truncates:
        bits = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(F32)
        return torch.from_numpy(bits).to(torch.bfloat16)  # exact: the low bits are zero
    return torch.from_numpy(x).to(dtype)


def adamw_step(p, g, m, v, vmax, step: int, *, lr, beta1, beta2, weight_decay, eps, amsgrad=False, maximize=False,
               grad_scale=None, bf16_truncates=False) -> None:  # fmt: skip
    """One step on CPU tensors (fp32, bf16 or fp16), in place, as torch's fused CUDA AdamW computes it."""
    dtype = p.dtype
    b1, b2, wd, e = F32(beta1), F32(beta2), F32(weight_decay), F32(eps)
    eta = F32(float(lr))  # a float rounds to nearest; an fp32 tensor lr is already fp32
    t = torch.tensor([float(step)], dtype=torch.float32)
    c1 = (1 - torch.pow(torch.tensor([[beta1], [beta2]], dtype=torch.float32), t)).numpy()[:, 0]
    bc1, bc2_sqrt = F32(c1[0]), np.sqrt(F32(c1[1]))
    step_size, lr_wd = F32(eta / bc1), F32(eta * wd)
    w, gg, mm, vv = (x.detach().float().numpy().astype(F32) for x in (p, g, m, v))
    if grad_scale is not None:
        gg = (gg / F32(float(grad_scale))).astype(F32)
        g.copy_(_store(gg, dtype, bf16_truncates))
    if maximize:
        gg = -gg
    g2 = (gg * gg).astype(F32)
    mm = fma32(mm, b1, fma32(gg, -b1, gg))
    vv = fma32(vv, b2, fma32(g2, -b2, g2))
    vhat = vv
    if amsgrad:
        vhat = np.maximum(vmax.float().numpy().astype(F32), vv)
        vmax.copy_(_store(vhat, dtype, bf16_truncates))
    denom = ((np.sqrt(vhat) / bc2_sqrt).astype(F32) + e).astype(F32)
    update = ((mm * step_size).astype(F32) / denom).astype(F32)
    decayed = fma32(w, -lr_wd, w) if wd != 0 else w
    p.copy_(_store((decayed - update).astype(F32), dtype, bf16_truncates))
    m.copy_(_store(mm, dtype, bf16_truncates))
    v.copy_(_store(vv, dtype, bf16_truncates))
