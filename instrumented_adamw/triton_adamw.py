"""Single-pass fused AdamW + force reductions in Triton: the ``fused=True`` path of InstrumentedAdamW on CUDA.

One read of p, g, m, v (and max v for AMSGrad), one write of p, m, v: the update and the three reductions
⟨W,û⟩, ‖û‖², ‖W‖² (W before the update) come out of the same pass, so tracking adds no memory traffic beyond a
few floats per block.

* **Multi-tensor**: all tensors of a (device, dtype) bucket go in one launch. Tables on the device hold each
  tensor's data pointers and size; a block table maps every program to (tensor, first element), with 64-bit
  offsets, so any tensor size works and tiny tensors cost one block.
* **Deterministic reductions**: each program sums its block in fp32 and writes one partial per quantity; a
  second kernel adds each tensor's partials in a fixed order in float64. No atomics: bitwise reproducible.
* **No host sync**: lr may be a device tensor (capturable / CUDA graphs); bias corrections are computed in the
  kernel from each tensor's step; ``found_inf`` (GradScaler) makes every program return before writing.

On CPU the same kernels run under ``TRITON_INTERPRET=1`` (tests); the optimizer uses this path only on CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Elements per program. 1024 fp32 elements × 5 streams keeps several 16-byte loads in flight per thread.
BLOCK = 1024


@triton.jit
def _adamw_block(
    block_tensor,  # int32 [programs]: which tensor this program works on
    block_start,  # int64 [programs]: its first element
    p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs,  # int64 [T]: data pointers
    numels,  # int64 [T]
    steps,  # fp32 [T]: the step count after this step's increment
    log_betas,  # fp64 [2]: ln β1, ln β2 (kernel float arguments are fp32: 1 − β2^t would lose 1e-5 at t = 1)
    lr_ptr,  # fp32/fp64 [1]
    grad_scale_ptr, found_inf_ptr,  # fp32 [1] each (dummies when absent)
    partials,  # fp32 [programs, 3]: Σ w·û, Σ û², Σ w² of the block
    weight_decay, beta1, beta2, eps,
    DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    if HAS_FOUND_INF:
        # GradScaler found inf/NaN: no element is read or written, the partials are 0, the caller drops the step.
        n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(DTYPE))

    w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(grad_scale_ptr)
    if MAXIMIZE:
        g = -g
    lr = tl.load(lr_ptr).to(tl.float32)
    step = tl.load(steps + t).to(tl.float64)
    # Bias corrections in float64, as torch computes them on the host: 1 − β^t cancels badly in fp32.
    bc1 = (1.0 - tl.exp(step * tl.load(log_betas))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.load(log_betas + 1))).to(tl.float32)

    m = m + (1.0 - beta1) * (g - m)  # lerp, as torch
    v = v * beta2 + (1.0 - beta2) * g * g
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_ptrs + t).to(tl.pointer_type(DTYPE))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + offs, vmax.to(DTYPE), mask=mask)
        vhat = vmax
    else:
        vhat = v
    u = (m / bc1) / (tl.sqrt(vhat) / bc2_sqrt + eps)  # û = m̂ / (√v̂ + ε)
    u = tl.where(mask, u, 0.0)

    tl.store(partials + pid * 3 + 0, tl.sum(w * u, axis=0))
    tl.store(partials + pid * 3 + 1, tl.sum(u * u, axis=0))
    tl.store(partials + pid * 3 + 2, tl.sum(w * w, axis=0))

    w_new = w * (1.0 - lr * weight_decay) - lr * u
    tl.store(p_ptr + offs, w_new.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _sum_partials(partials, first_block, n_blocks, out, CHUNK: tl.constexpr):
    """Stage two: tensor t's partials, added in a fixed order in float64 (one program per tensor)."""
    t = tl.program_id(0)
    first = tl.load(first_block + t)
    count = tl.load(n_blocks + t)
    acc0 = tl.zeros([CHUNK], dtype=tl.float64)
    acc1 = tl.zeros([CHUNK], dtype=tl.float64)
    acc2 = tl.zeros([CHUNK], dtype=tl.float64)
    for i in range(0, count, CHUNK):
        idx = first + i + tl.arange(0, CHUNK).to(tl.int64)
        mask = (i + tl.arange(0, CHUNK)) < count
        acc0 += tl.load(partials + idx * 3 + 0, mask=mask, other=0.0).to(tl.float64)
        acc1 += tl.load(partials + idx * 3 + 1, mask=mask, other=0.0).to(tl.float64)
        acc2 += tl.load(partials + idx * 3 + 2, mask=mask, other=0.0).to(tl.float64)
    tl.store(out + t * 3 + 0, tl.sum(acc0, axis=0))
    tl.store(out + t * 3 + 1, tl.sum(acc1, axis=0))
    tl.store(out + t * 3 + 2, tl.sum(acc2, axis=0))


#: Compiler options of both launches. Contraction into FMA is what the kernels were validated with on GPU (Triton's
#: default up to 3.9, which changes it in 3.10): pinned, so that a Triton upgrade cannot move the numerics.
_COMPILE_OPTIONS = {"enable_fp_fusion": True}

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class LaunchPlan:
    """Device tables of one bucket (pointers, sizes, block table).

    The storage of parameters and moments does not move between steps, so their tables are built once (the key
    is their data pointers). Gradients are new tensors after every ``zero_grad(set_to_none=True)``: their pointer
    table is refreshed through a pinned host buffer and an asynchronous copy, so a step never waits on the
    device for it (an event guards the buffer against overwriting a copy still in flight).
    """

    def __init__(self, tensors: list[list[Tensor]], block: int = BLOCK) -> None:
        params = tensors[0]
        device = params[0].device
        self.key = tuple(tuple(t.data_ptr() for t in ts) for ts in tensors)
        self.numels = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
        self.ptrs = [
            torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device) if ts else self.numels
            for ts in tensors
        ]
        pin = device.type == "cuda"
        self._grad_host = torch.zeros(len(params), dtype=torch.int64, pin_memory=pin)
        self.grad_ptrs = torch.zeros(len(params), dtype=torch.int64, device=device)
        self._grad_key: tuple[int, ...] | None = None
        self._grad_copied = torch.cuda.Event() if pin else None
        counts = [max(1, -(-p.numel() // block)) for p in params]
        owner, starts = [], []
        for i, c in enumerate(counts):
            owner.extend([i] * c)
            starts.extend(range(0, c * block, block))
        self.block_tensor = torch.tensor(owner, dtype=torch.int32, device=device)
        self.block_start = torch.tensor(starts, dtype=torch.int64, device=device)
        first = [0]
        for c in counts[:-1]:
            first.append(first[-1] + c)
        self.first_block = torch.tensor(first, dtype=torch.int64, device=device)
        self.n_blocks = torch.tensor(counts, dtype=torch.int64, device=device)
        self.programs = len(owner)
        self.betas: tuple[float, float] | None = None
        self.log_betas: Tensor | None = None

    def set_grads(self, grads: list[Tensor]) -> Tensor:
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key:
            if self._grad_copied is not None:
                self._grad_copied.synchronize()  # the previous copy from the buffer (a step ago) is done
            self._grad_host.copy_(torch.tensor(key, dtype=torch.int64))
            self.grad_ptrs.copy_(self._grad_host, non_blocking=True)
            if self._grad_copied is not None:
                self._grad_copied.record()
            self._grad_key = key
        return self.grad_ptrs


def fused_adamw_reduce(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: Tensor,
    *,
    lr: float | Tensor,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    plan: LaunchPlan | None = None,
) -> tuple[Tensor, LaunchPlan]:
    """AdamW step of one (device, dtype) bucket in place; returns ``[T, 3]`` float64 (⟨W,û⟩, ‖û‖², ‖W‖²).

    ``steps`` is a float32 device tensor [T] of step counts *after* this step's increment. All tensors must be
    contiguous and share the params' dtype (fp32, bf16 or fp16; math in fp32). Pass the returned plan back in to
    skip rebuilding the device tables while the tensors stay the same.
    """
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _DTYPES:
        raise TypeError(f"fused_adamw_reduce supports {list(_DTYPES)}, got {dtype}")
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    for ts in lists:
        for t in ts:
            if t.dtype != dtype or not t.is_contiguous() or t.device != device:
                raise ValueError("fused_adamw_reduce needs contiguous tensors of one device and dtype per bucket")
    static = [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    key = tuple(tuple(t.data_ptr() for t in ts) for ts in static)
    if plan is None or plan.key != key:
        plan = LaunchPlan(static)
    p_ptrs, m_ptrs, v_ptrs, vmax_ptrs = plan.ptrs
    g_ptrs = plan.set_grads(grads)
    lr_t = lr.reshape(1).to(device) if isinstance(lr, Tensor) else torch.full((1,), lr, device=device)
    if plan.betas != (beta1, beta2):
        plan.log_betas = torch.tensor([math.log(beta1), math.log(beta2)], dtype=torch.float64, device=device)
        plan.betas = (beta1, beta2)
    dummy = torch.zeros(1, device=device)
    partials = torch.empty(plan.programs, 3, dtype=torch.float32, device=device)
    _adamw_block[(plan.programs,)](
        plan.block_tensor, plan.block_start, p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, plan.numels, steps,
        plan.log_betas, lr_t,
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        partials, float(weight_decay), float(beta1), float(beta2), float(eps),
        DTYPE=_DTYPES[dtype], AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK, **_COMPILE_OPTIONS,
    )  # fmt: skip
    out = torch.empty(len(params), 3, dtype=torch.float64, device=device)
    _sum_partials[(len(params),)](partials, plan.first_block, plan.n_blocks, out, CHUNK=64, **_COMPILE_OPTIONS)
    return out, plan
