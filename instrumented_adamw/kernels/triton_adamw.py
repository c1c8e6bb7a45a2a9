"""Single-pass fused AdamW + force reductions in Triton: the ``fused=True`` path of InstrumentedAdamW on CUDA.

One read of p, g, m, v (and max v for AMSGrad), one write of p, m, v: the update and the three reductions
⟨W,û⟩, ‖û‖², ‖W‖² (W before the update) come out of the same pass, so tracking adds no memory traffic beyond a
few floats per block.

* **Multi-tensor**: all tensors of a (device, dtype) bucket go in one launch. Tables on the device hold each
  tensor's data pointers and size; a block table maps every program to (tensor, first element), with 64-bit
  offsets, so any tensor size works and tiny tensors cost one block.
* **16-byte accesses**: pointers read from a table carry no alignment the compiler could see, and a mask against
  a size read from memory is not known to be constant over 16 bytes, so without help every access is scalar. Each
  program therefore checks its tensor at run time: when p, g, m, v (and max v) are 16-byte aligned and the block's
  valid length is a multiple of 16 bytes (a full block, or a tail that is), it runs the update with
  ``tl.multiple_of`` hints on pointers and length, which compile to ``ld.global.v4.b32`` / ``st.global.v4.b32``;
  otherwise (a view with a storage offset, a ragged tail) the same update runs element by element. The check is
  per tensor and per step, in the kernel, so gradients that are views need nothing on the host and one odd tensor
  does not slow its bucket. ``tests/test_kernel_ptx.py`` compiles every variant for sm_80 and sm_90 on CPU and
  holds the PTX and SASS to that: (4 + amsgrad) streams loaded and (3 + amsgrad) stored in 16-byte vectors in the
  fast path, a scalar fallback, no local memory (docs/benchmarks.md lists the counts).
* **Few variants**: only DTYPE, AMSGRAD and HAS_SCALE (the division) are compile-time; maximize is a ±1 factor
  (exact), found_inf always a pointer (a zero without GradScaler), lr converted to fp32 on the host, and no
  argument's alignment specialises: 12 variants per GPU architecture, each compiled once on first use.
* **Deterministic reductions**: each program sums its block in fp32 and writes one partial per quantity; a
  second kernel adds each tensor's partials in a fixed order in float64. No atomics: bitwise reproducible.
* **Recorded in the kernel**: on an eager step with float η and λ the second kernel also folds the step into the
  tensor's row of the force table (``ForceStats.record``'s arithmetic, without FMA contraction: the same bits).
  The host then launches two kernels per bucket and nothing else for tracking, where the table update was some
  forty small launches, most of a small model's host time per step.
* **Torch's arithmetic**: the update is torch's fused CUDA AdamW's, operation for operation, as read from its sm_90
  SASS (torch 2.13; docs/torch_fused_adamw.md): hyperparameters in fp32, 1 − β^t from ``torch.pow`` (the ``pow_``
  torch's kernel calls), the multiply-adds it contracts as explicit ``tl.fma`` and fp fusion off otherwise,
  correctly rounded division and square root; with GradScaler the unscaled gradient is written back, as torch's
  kernel does. :func:`mismatch_with_torch` probes it against ``torch.optim.AdamW(fused=True)`` on the device.
* **No host sync**: lr may be a device tensor (capturable / CUDA graphs); the bias corrections are two small device
  ops per bucket; ``found_inf`` (GradScaler) makes every program skip its block before writing.

On CPU the same kernels run under ``TRITON_INTERPRET=1`` (tests); the optimizer uses this path only on CUDA.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from instrumented_adamw.kernels.force_table import TABLE_LAYOUT

#: Elements per program. 1024 fp32 elements × 5 streams keeps several 16-byte loads in flight per thread.
BLOCK = 1024

#: Bytes of the widest global load or store a CUDA thread issues (``ld.global.v4.b32``, ``LDG.E.128``).
VECTOR_BYTES = tl.constexpr(16)

# No argument's address makes a variant (Triton would otherwise compile one per 16-byte-aligned or not): the data
# pointers travel in tables and are checked per tensor in the kernel; the arguments are scalars and tables read
# element by element, where alignment buys nothing. The variants are DTYPE × AMSGRAD × HAS_SCALE, all of which
# tests/test_kernel_ptx.py compiles for sm_80 and sm_90.
_POINTER_ARGS = (
    "block_tensor", "block_start", "p_ptrs", "g_ptrs", "m_ptrs", "v_ptrs", "vmax_ptrs", "numels", "coeffs",
    "lr_ptr", "grad_scale_ptr", "found_inf_ptr", "partials",
)  # fmt: skip


@triton.jit
def _step_block(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr,  # this block's first element in each stream
    rem,  # int32: elements valid from there (BLOCK for a full block)
    grad_scale_ptr, grad_sign, lr_wd, bc1, bc2_sqrt, step_size, weight_decay, beta1, beta2, eps,
    DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The update of one block and its three fp32 partial sums. The caller inlines it twice, with and without the
    hints that allow 16-byte accesses; the arithmetic is the same in both.

    The update is torch's fused CUDA AdamW's operation for operation, as its sm_90 SASS does it (torch 2.13,
    docs/torch_fused_adamw.md): fp32 throughout, the multiply-adds it contracts as explicit FMAs and no other
    contraction (the kernel compiles with fp fusion off), correctly rounded division and square root."""
    idx = tl.arange(0, BLOCK)
    mask = idx < rem
    w = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:  # GradScaler: unscaled in the kernel, and written back unscaled as torch's kernel does
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
        tl.store(g_ptr + idx, g.to(DTYPE), mask=mask)
    g = g * grad_sign  # ±1: exact, so maximize costs no variant
    g2 = g * g
    m = tl.fma(m, beta1, tl.fma(g, -beta1, g))  # β1·m + (g − β1·g)
    v = tl.fma(v, beta2, tl.fma(g2, -beta2, g2))
    if AMSGRAD:
        vhat = tl.maximum(tl.load(vmax_ptr + idx, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + idx, vhat.to(DTYPE), mask=mask)
    else:
        vhat = v
    denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
    step = tl.div_rn(m * step_size, denom)  # η·m̂/(√v̂ + ε), rounded as torch rounds it
    decayed = tl.where(weight_decay != 0.0, tl.fma(w, -lr_wd, w), w)  # (1 − ηλ)·W in one rounding
    w_new = decayed - step
    u = tl.where(mask, (m / bc1) / denom, 0.0)  # û = m̂ / (√v̂ + ε), for the reductions (η may be 0)
    tl.store(p_ptr + idx, w_new.to(DTYPE), mask=mask)
    tl.store(m_ptr + idx, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + idx, v.to(DTYPE), mask=mask)
    return tl.sum(w * u, axis=0), tl.sum(u * u, axis=0), tl.sum(w * w, axis=0)


@triton.jit(do_not_specialize_on_alignment=_POINTER_ARGS)
def _adamw_block(
    block_tensor,  # int32 [programs]: which tensor this program works on
    block_start,  # int64 [programs]: its first element, a multiple of BLOCK
    p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs,  # int64 [T]: data pointers
    numels,  # int64 [T]
    coeffs,  # fp32 [T, 2]: 1 − β1^t, 1 − β2^t of each tensor's step t (torch's own pow)
    lr_ptr,  # fp32 [1]
    grad_scale_ptr,  # fp32 [1] (a dummy without HAS_SCALE)
    found_inf_ptr,  # fp32 [1]: nonzero skips the step (a zero without GradScaler)
    partials,  # fp32 [programs, 3]: Σ w·û, Σ û², Σ w² of the block
    grad_sign,  # -1.0 to maximize, else 1.0
    weight_decay, beta1, beta2, eps,
    DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    VEC: tl.constexpr = VECTOR_BYTES * 8 // DTYPE.primitive_bitwidth  # elements per 16-byte access
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # true by construction of the block table
    # GradScaler found inf/NaN: no element is read or written, the partials are 0, the caller drops the step.
    n = tl.where(tl.load(found_inf_ptr) == 0, tl.load(numels + t), 0)
    p_addr = tl.load(p_ptrs + t)
    g_addr = tl.load(g_ptrs + t)
    m_addr = tl.load(m_ptrs + t)
    v_addr = tl.load(v_ptrs + t)
    addr_bits = p_addr | g_addr | m_addr | v_addr
    if AMSGRAD:
        vmax_addr = tl.load(vmax_ptrs + t)
        addr_bits = addr_bits | vmax_addr
    else:
        vmax_addr = p_addr  # never dereferenced
    lr = tl.load(lr_ptr)
    lr_wd = lr * weight_decay  # fp32, as torch's kernel forms η·λ
    bc1 = tl.load(coeffs + t * 2)
    bc2_sqrt = tl.sqrt_rn(tl.load(coeffs + t * 2 + 1))
    step_size = tl.div_rn(lr, bc1)

    # Elements in this block: BLOCK, fewer in a tensor's last block, none after found_inf (clamped at 0 so that the
    # int32 conversion cannot wrap for blocks past 2^31 elements).
    rem = tl.maximum(tl.minimum(n - start, BLOCK), 0)
    ty = tl.pointer_type(DTYPE)
    # 16-byte accesses need every stream 16-byte aligned (torch allocates at 512 bytes, but a view with a storage
    # offset may not be) and a mask constant over each group of VEC elements (a full block, or a tail whose length
    # is a multiple of VEC). Decided per tensor, here, for what this step passes (a gradient may be a view): the
    # other tensors of the bucket keep the fast path, and nothing on the host can go stale.
    if ((addr_bits % VECTOR_BYTES) == 0) & ((rem % VEC) == 0):
        # Hazard: tl.multiple_of marks the operation that defines its argument, so each hint goes on an operation
        # created in this branch; hinting p_addr or rem themselves would make the fallback assume alignment too.
        s_wu, s_uu, s_ww = _step_block(
            tl.multiple_of(p_addr.to(ty), VECTOR_BYTES) + start,
            tl.multiple_of(g_addr.to(ty), VECTOR_BYTES) + start,
            tl.multiple_of(m_addr.to(ty), VECTOR_BYTES) + start,
            tl.multiple_of(v_addr.to(ty), VECTOR_BYTES) + start,
            tl.multiple_of(vmax_addr.to(ty), VECTOR_BYTES) + start,
            tl.multiple_of(rem.to(tl.int32), VEC), grad_scale_ptr, grad_sign, lr_wd, bc1, bc2_sqrt, step_size,
            weight_decay, beta1, beta2, eps, DTYPE, AMSGRAD, HAS_SCALE, BLOCK,
        )  # fmt: skip
    else:  # misaligned, or the ragged tail of a tensor whose size is not a multiple of VEC: element by element
        s_wu, s_uu, s_ww = _step_block(
            p_addr.to(ty) + start, g_addr.to(ty) + start, m_addr.to(ty) + start, v_addr.to(ty) + start,
            vmax_addr.to(ty) + start, rem.to(tl.int32), grad_scale_ptr, grad_sign, lr_wd, bc1, bc2_sqrt, step_size,
            weight_decay, beta1, beta2, eps, DTYPE, AMSGRAD, HAS_SCALE, BLOCK,
        )  # fmt: skip
    tl.store(partials + pid * 3 + 0, s_wu)
    tl.store(partials + pid * 3 + 1, s_uu)
    tl.store(partials + pid * 3 + 2, s_ww)


@triton.jit
def _f64(hi, lo):
    """The float64 whose bits are ``hi``·2³² + ``lo`` (two int32 halves: kernel float arguments are fp32, and an
    int64 argument would be typed by its value, a small one as int32, making a variant)."""
    return ((hi.to(tl.int64) << 32) | lo.to(tl.uint32).to(tl.int64)).to(tl.float64, bitcast=True)


# found_inf comes from GradScaler (any address); the table and rows are ours, and read or written one element at a
# time, where alignment buys nothing.
@triton.jit(
    do_not_specialize=("lr_hi", "lr_lo", "wd_hi", "wd_lo"),
    do_not_specialize_on_alignment=("table", "rows", "found_inf_ptr"),
)
def _sum_partials(
    partials, first_block, n_blocks, out,
    table,  # fp64 [rows, WIDTH]: the device's force table (a dummy without RECORD)
    rows,  # int64 [T]: each tensor's row of it, −1 for a tensor not measured
    found_inf_ptr,  # fp32 [1]: nonzero, the step was skipped (GradScaler) and is not recorded
    lr_hi, lr_lo, wd_hi, wd_lo,  # η and λ in float64, as the halves of their bits
    CHUNK: tl.constexpr,
    RECORD: tl.constexpr,
    WIDTH: tl.constexpr, N_LAST: tl.constexpr, N_SUM: tl.constexpr, LAST: tl.constexpr, SUM: tl.constexpr,
    START_W_SQ: tl.constexpr, STEPS: tl.constexpr, NONFINITE: tl.constexpr, LAST_FINITE: tl.constexpr,
    UNMEASURED_SINCE_LAST: tl.constexpr, START_KNOWN: tl.constexpr,
):  # fmt: skip
    """Stage two: tensor t's partials, added in a fixed order in float64 (one program per tensor).

    With RECORD, the program also folds the step into the tensor's row of the force table, which is what
    ``ForceStats.record`` does with ``forces_from_reductions`` for one measured step (``measured=None``): the same
    float64 operations in the same order, so the table is the same bit for bit (this kernel is compiled without
    FMA contraction). One launch instead of some forty small ones on the host's critical path of every step."""
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
    wu = tl.sum(acc0, axis=0)
    uu = tl.sum(acc1, axis=0)
    ww = tl.sum(acc2, axis=0)
    tl.store(out + t * 3 + 0, wu)
    tl.store(out + t * 3 + 1, uu)
    tl.store(out + t * 3 + 2, ww)
    if RECORD:
        row = tl.load(rows + t)
        if row >= 0:
            eta = _f64(lr_hi, lr_lo)
            lam = _f64(wd_hi, wd_lo)
            shrink = eta * lam
            align = -2.0 * eta * wu
            inject = eta * eta * uu
            decay = -2.0 * shrink * ww
            higher = 2.0 * eta * shrink * wu + shrink * shrink * ww
            # The row of LAST_KEYS: w_dot_u, u_sq, w_sq, align, inject, decay, higher_order, eta_lambda, lr,
            # weight_decay, update_lr (= lr for AdamW).
            c = tl.arange(0, 16)
            vals = tl.where(c == 0, wu, tl.where(c == 1, uu, tl.where(c == 2, ww, tl.where(c == 3, align, 0.0))))
            vals = tl.where(c == 4, inject, tl.where(c == 5, decay, tl.where(c == 6, higher, vals)))
            vals = tl.where(c == 7, shrink, tl.where((c == 8) | (c == 10), eta, tl.where(c == 9, lam, vals)))
            # x − x is 0 exactly for a finite x, NaN for ±inf and NaN.
            finite = tl.sum(tl.where((c < N_SUM) & ((vals - vals) != 0.0), 1, 0), axis=0) == 0
            recorded = tl.load(found_inf_ptr) == 0
            valid = finite & recorded
            base = table + row * WIDTH
            last_old = tl.load(base + LAST + c, mask=c < N_LAST, other=0.0)
            tl.store(base + LAST + c, tl.where(recorded, vals, last_old), mask=c < N_LAST)
            sum_old = tl.load(base + SUM + c, mask=c < N_SUM, other=0.0)
            tl.store(base + SUM + c, sum_old + tl.where(valid, vals, 0.0), mask=c < N_SUM)
            steps_old = tl.load(base + STEPS)
            opens = valid & (steps_old == 0.0) & (tl.load(base + START_KNOWN) == 0.0)
            tl.store(base + START_W_SQ, tl.where(opens, ww, tl.load(base + START_W_SQ)))
            tl.store(base + STEPS, steps_old + tl.where(valid, 1.0, 0.0))
            tl.store(base + NONFINITE, tl.load(base + NONFINITE) + tl.where(recorded & ~finite, 1.0, 0.0))
            tl.store(base + LAST_FINITE, tl.where(recorded, tl.where(finite, 1.0, 0.0), tl.load(base + LAST_FINITE)))
            # A measured step: nothing unmeasured since the last one (the UNMEASURED count itself is unchanged).
            since = tl.load(base + UNMEASURED_SINCE_LAST)
            tl.store(base + UNMEASURED_SINCE_LAST, tl.where(recorded, 0.0, since))


#: Compiler options of the update: no contraction into FMA beyond the explicit ``tl.fma`` where torch's kernel has
#: one (Triton 3.9 warns that its default changes in 3.10: set explicitly, so an upgrade cannot move the numerics).
_COMPILE_OPTIONS = {"enable_fp_fusion": False}
#: The partial sums and the table update: no contraction, so the forces round as torch's separate ops do.
_SUM_OPTIONS = {"enable_fp_fusion": False}


def _halves(x: float) -> tuple[int, int]:
    """The bits of float64 ``x`` as two signed int32 (high, low), for ``_f64`` in a kernel."""
    lo, hi = struct.unpack("<ii", struct.pack("<d", x))
    return hi, lo


@dataclass(frozen=True)
class RecordInto:
    """Where the second launch folds a measured step (see ``_sum_partials``): a force table on the bucket's device,
    each tensor's row of it (−1: not measured) and the step's float η and λ."""

    table: Tensor
    rows: Tensor
    lr: float
    weight_decay: float


_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _check_bucket(lists: list[list[Tensor]], dtype: torch.dtype, device: torch.device) -> None:
    for ts in lists:
        for t in ts:
            if t.dtype != dtype or not t.is_contiguous() or t.device != device:
                raise ValueError("fused_adamw_reduce needs contiguous tensors of one device and dtype per bucket")


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
        _check_bucket(tensors, params[0].dtype, device)
        self.dtype, self.device = params[0].dtype, device
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
        self.beta_t: Tensor | None = None  # fp32 [2, 1]: β1, β2 as torch's kernel rounds them
        self.zero = torch.zeros(1, device=device)  # found_inf without GradScaler, grad_scale's unread stand-in

    def set_grads(self, grads: list[Tensor]) -> Tensor:
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key:
            _check_bucket([grads], self.dtype, self.device)  # new gradient tensors: checked once, not every step
            if self._grad_copied is not None:
                self._grad_copied.synchronize()  # the previous copy from the buffer (a step ago) is done
            self._grad_host.copy_(torch.tensor(key, dtype=torch.int64))
            self.grad_ptrs.copy_(self._grad_host, non_blocking=True)
            if self._grad_copied is not None:
                self._grad_copied.record()
            self._grad_key = key
        return self.grad_ptrs


def bias_corrections(betas: Tensor, steps: Tensor) -> Tensor:
    """``[T, 2]`` fp32: 1 − β1^t and 1 − β2^t for each tensor's step count t, as torch's fused CUDA kernel forms
    them: β in fp32, ``pow`` of two fp32 numbers (on CUDA ``torch.pow`` runs the same ``pow_`` that kernel calls),
    an fp32 subtraction. Two tiny launches on the device, no host sync; the kernel takes the square root and the
    step size η/(1 − β1^t) itself, correctly rounded (torch's CPU ``sqrt`` is not, and the interpreter runs on
    the CPU)."""
    return (1 - torch.pow(betas, steps[None, :])).t().contiguous()


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
    record: RecordInto | None = None,
) -> tuple[Tensor, LaunchPlan]:
    """AdamW step of one (device, dtype) bucket in place; returns ``[T, 3]`` float64 (⟨W,û⟩, ‖û‖², ‖W‖²).

    ``steps`` is a float32 device tensor [T] of step counts *after* this step's increment. All tensors must be
    contiguous and share the params' dtype (fp32, bf16 or fp16; math in fp32); any alignment works (16-byte
    aligned tensors get vectorised accesses). Pass the returned plan back in to skip rebuilding the device tables
    while the tensors stay the same.
    """
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _DTYPES:
        raise TypeError(f"fused_adamw_reduce supports {list(_DTYPES)}, got {dtype}")
    static = [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    # The tensors are checked where their pointer tables are built (a new plan, new gradients), not every step: on
    # small models the host time of the step is what a sub-millisecond kernel cannot hide. Same pointers, same tensors.
    key = tuple(tuple(t.data_ptr() for t in ts) for ts in static)
    if plan is None or plan.key != key:
        plan = LaunchPlan(static)
    p_ptrs, m_ptrs, v_ptrs, vmax_ptrs = plan.ptrs
    if any(g.dtype != dtype for g in grads):  # cheap: a gradient of another dtype must fail, not be misread
        _check_bucket([grads], dtype, device)
    g_ptrs = plan.set_grads(grads)
    # lr in fp32 on the host, as the kernel would convert it (round to nearest): a float64 lr tensor is no variant.
    if isinstance(lr, Tensor):
        lr_t = lr.reshape(1).to(device=device, dtype=torch.float32)
    else:
        lr_t = torch.full((1,), lr, dtype=torch.float32, device=device)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1):
            raise TypeError(f"{name} must be a one-element float32 tensor (as GradScaler passes it), got {t.dtype} "
                            f"of shape {tuple(t.shape)}")  # fmt: skip
    if plan.betas != (beta1, beta2):
        plan.beta_t = torch.tensor([[beta1], [beta2]], dtype=torch.float32, device=device)
        plan.betas = (beta1, beta2)
    coeffs = bias_corrections(plan.beta_t, steps)
    partials = torch.empty(plan.programs, 3, dtype=torch.float32, device=device)
    _adamw_block[(plan.programs,)](
        plan.block_tensor, plan.block_start, p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, plan.numels, coeffs,
        lr_t, plan.zero if grad_scale is None else grad_scale,
        plan.zero if found_inf is None else found_inf, partials, -1.0 if maximize else 1.0,
        float(weight_decay), float(beta1), float(beta2), float(eps),
        DTYPE=_DTYPES[dtype], AMSGRAD=amsgrad, HAS_SCALE=grad_scale is not None, BLOCK=BLOCK,
        **_COMPILE_OPTIONS,
    )  # fmt: skip
    out = torch.empty(len(params), 3, dtype=torch.float64, device=device)
    if record is None:
        table, rows, lr_bits, wd_bits = out, plan.numels, (0, 0), (0, 0)
    else:
        table, rows, lr_bits, wd_bits = record.table, record.rows, _halves(record.lr), _halves(record.weight_decay)
    _sum_partials[(len(params),)](
        partials, plan.first_block, plan.n_blocks, out, table, rows, plan.zero if found_inf is None else found_inf,
        *lr_bits, *wd_bits, CHUNK=64, RECORD=record is not None, **TABLE_LAYOUT, **_SUM_OPTIONS,
    )  # fmt: skip
    return out, plan


# ---------------------------------------------------------------------------------------------- probe
_PROBED: dict[tuple[str, torch.dtype], str | None] = {}


def mismatch_with_torch(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel's update is not ``torch.optim.AdamW(fused=True)``'s bitwise on this device and dtype, or None
    when it is: probed once per (device, dtype) on data that exercises every branch of the arithmetic (decay on
    and off, AMSGrad, maximize, late steps, tiny and large gradients). The kernel reproduces the arithmetic read
    from one torch build's SASS (docs/torch_fused_adamw.md); another build may round elsewhere, and then the
    optimizer steps with torch's own fused kernel instead (still measured, in a second pass)."""
    key = (str(device), dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe(device, dtype)
    return _PROBED[key]


def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 5, 1031, 4096)
    for amsgrad, maximize, weight_decay, first_step in ((False, False, 0.1, 0), (True, True, 0.0, 997)):
        base = [(0.02 * torch.randn(n, generator=gen)).to(device, dtype) for n in sizes]
        ours = [p.clone() for p in base]
        theirs = [torch.nn.Parameter(p.clone()) for p in base]
        opt = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                amsgrad=amsgrad, maximize=maximize, fused=True)  # fmt: skip
        m, v, vmax = ([torch.zeros_like(p) for p in ours] for _ in range(3))
        for step in range(first_step + 1, first_step + 6):
            scale = 10.0 ** (step % 5 - 2)  # gradients from 1e-4 to 1e2 of the weights
            grads = [(scale * torch.randn(p.shape, generator=gen)).to(device, dtype) for p in ours]
            for p, g in zip(theirs, grads, strict=True):
                p.grad = g.clone()
                if step == first_step + 1 and first_step:  # a late step: bias corrections near 1
                    opt.state[p]["step"] = torch.tensor(float(first_step), dtype=torch.float32, device=device)
                    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        opt.state[p][name] = torch.zeros_like(p)
            opt.step()
            fused_adamw_reduce(ours, grads, m, v, vmax, torch.full((len(ours),), float(step), device=device),
                               lr=3e-3, weight_decay=weight_decay, beta1=0.9, beta2=0.999, eps=1e-8,
                               amsgrad=amsgrad, maximize=maximize)  # fmt: skip
            for a, b in zip(ours, theirs, strict=True):
                if not torch.equal(a, b.detach()):
                    worst = (a.float() - b.detach().float()).abs().max().item()
                    return (f"parameters differ from torch.optim.AdamW(fused=True)'s at step {step} "
                            f"(amsgrad={amsgrad}, maximize={maximize}, weight_decay={weight_decay}; largest "
                            f"difference {worst:.3g}): this torch build's fused kernel rounds elsewhere")  # fmt: skip
    return None
