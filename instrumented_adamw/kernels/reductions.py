"""Accurate, allocation-light inner products for the force reductions.

``torch.dot`` in fp32 is fast but loses ~1e-6 relative on a large tensor; a float64 sum is exact but converts every
element first, many times slower. Summing ``ROW`` products in fp32 (short sums, so accurate) and the per-row results
in float64 keeps ~1e-10 at nearly the speed of the fp32 dot: on tensors up to :data:`ROWS_MAX` elements as one
multiply and a row sum, beyond as a row-blocked batched matmul (no full-size temporary); squared norms as per-row
``vector_norm`` (no temporary). The strategies compared, with figures: ``bench/reductions_cpu.py``,
``docs/benchmarks.md`` ("Inner-product strategy for the reductions").
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from instrumented_adamw.kernels import cpu_adamw

#: Elements per row of the blocked dot product: the fastest of 64..4096 on CPU, with ~1e-10 error.
ROW = 128
#: Largest tensor whose dot product takes a multiply-and-row-sum (a temporary of its size: 16 MB in fp32): faster
#: than the batched matmul on small tensors, slower on embedding-sized ones.
ROWS_MAX = 1 << 22

_EXACT_DTYPES = (torch.float32, torch.float64)
_PLAIN = (Tensor, nn.Parameter)
#: Per-thread scratch for the products of :func:`dot_f64` on CPU: a fresh 4 MB temporary per call costs its page
#: faults every time, several times the multiply into a kept buffer. CUDA's caching allocator makes temporaries
#: cheap there.
_SCRATCH = threading.local()


def _products(a: Tensor, b: Tensor) -> Tensor:
    """a * b (same shape, contiguous), into a kept per-thread buffer on CPU."""
    if a.device.type != "cpu":
        return a * b
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(a.dtype)
    if buf is None or buf.numel() < a.numel():
        buf = bufs[a.dtype] = torch.empty(a.numel(), dtype=a.dtype)
    return torch.mul(a, b, out=buf[: a.numel()].view(a.shape))


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for the reductions: fp32 for half/bf16 params (so û is not rounded to 8 bits), else own."""
    return dtype if dtype in _EXACT_DTYPES else torch.float32


def dot_f64(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Σ a_i b_i as a 0-d float64 tensor, accumulated in fp32 over rows of ``ROW`` and float64 across rows.

    ``a`` and ``b`` must have the same shape; they are read in logical (row-major) order, so differing memory
    layouts still pair the right elements. No host synchronisation.
    """
    if a.shape != b.shape:
        raise ValueError(f"dot_f64 needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if torch.compiler.is_compiling():
        # Under torch.compile the conversion, products and float64 sum become one loop over a and b (Inductor
        # fuses them, and the û feeding them, without temporaries); the row-blocked bmm would be an external call
        # on materialised operands.
        return (a.to(torch.float64) * b.to(torch.float64)).sum()
    dtype = dtype or reduction_dtype(a.dtype)
    a = a.reshape(-1).to(dtype)
    b = b.reshape(-1).to(dtype)
    n = a.numel()
    main = n - n % ROW
    if not main:
        total = torch.zeros((), dtype=torch.float64, device=a.device)
    elif main <= ROWS_MAX:
        total = _products(a[:main].view(-1, ROW), b[:main].view(-1, ROW)).sum(1).sum(dtype=torch.float64)
    else:
        total = torch.bmm(a[:main].view(-1, 1, ROW), b[:main].view(-1, ROW, 1)).sum(dtype=torch.float64)
    if main < n:
        total = total + torch.dot(a[main:].double(), b[main:].double())
    return total


def sq_f64(a: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """‖a‖² as a 0-d float64 tensor, with :func:`dot_f64`'s accuracy: per-row norms over rows of ``ROW`` elements
    (one pass, no temporary), squared and summed in float64."""
    if torch.compiler.is_compiling():
        return dot_f64(a, a, dtype)
    dtype = dtype or reduction_dtype(a.dtype)
    a = a.reshape(-1).to(dtype)
    n = a.numel()
    main = n - n % ROW
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    if main:
        total = torch.linalg.vector_norm(a[:main].view(-1, ROW), dim=1).double().square().sum()
    if main < n:
        total = total + torch.dot(a[main:].double(), a[main:].double())
    return total


def sq_norms_exact(tensors: list[Tensor]) -> Tensor:
    """Each tensor's ‖t‖², accumulated in float64 (~1e-12 relative), as one float64 [n] tensor: the read-out's
    ‖W‖², taken on log steps only.

    The interval residual is ‖W‖²_now − ‖W‖²_start − Σ forces, a difference of two nearly equal norms: the fp32 rows
    of :func:`dot_f64` (~1e-8 relative on a small tensor) would bury the fp32 storage rounding it exists to show.
    One multi-tensor norm: on a GPU one launch for all tensors of a device, where a norm per tensor cost a small
    model's read more host time than its bandwidth-bound pass. On CPU, plain contiguous float32/float64 tensors
    go through the C library's one-read reduction instead (exact products summed in float64, ~1e-15): torch's
    float64 norm converts each tensor first, which was most of a CPU run's log (docs/benchmarks.md).
    """
    if tensors and not torch.compiler.is_compiling() and all(_c_reducible(t, t) for t in tensors):
        lib = cpu_adamw.library()
        if lib is not None:
            out = torch.empty(len(tensors), 3, dtype=torch.float64)
            for t, row in zip(tensors, out, strict=True):
                lib.reduce3(t, t, row)
            return out[:, 1].contiguous()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()


def reduce3(w: Tensor, u: Tensor, out: Tensor | None = None) -> Tensor:
    """The three per-tensor reductions ``[⟨w,u⟩, ‖u‖², ‖w‖²]`` as a float64 vector of length 3 (into ``out`` if
    given), all in the arithmetic of the parameter's dtype (Muon's u is bf16 whatever W is: float64 W keeps float64
    sums).

    On CPU, for contiguous float32/float64 tensors of one dtype, the C library of :mod:`.cpu_adamw` reads w and u
    once and sums exact float64 products (~1e-15 relative; 3 passes and a temporary otherwise); without a C
    compiler the torch ops below give ~1e-10."""
    dtype = reduction_dtype(w.dtype)
    compiling = torch.compiler.is_compiling()
    if not compiling and _c_reducible(w, u):
        lib = cpu_adamw.library()
        if lib is not None:
            if out is None:
                out = torch.empty(3, dtype=torch.float64)
            lib.reduce3(w, u, out)
            return out
    if u.dtype != dtype and not compiling:
        u = u.to(dtype)  # once, not in each of the two dot products that read it (Muon's bf16 O)
    values = torch.stack((dot_f64(w, u, dtype), sq_f64(u, dtype), sq_f64(w, dtype)))
    if out is None:
        return values
    return out.copy_(values)


def _c_reducible(w: Tensor, u: Tensor) -> bool:
    """Plain contiguous CPU tensors of one exact dtype and shape (no subclass: a DTensor's data is its shard)."""
    return (
        type(w) in _PLAIN
        and type(u) in _PLAIN
        and w.device.type == "cpu"
        and u.device.type == "cpu"
        and w.dtype == u.dtype
        and w.dtype in _EXACT_DTYPES
        and w.shape == u.shape
        and w.is_contiguous()
        and u.is_contiguous()
    )
