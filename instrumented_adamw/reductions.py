"""Accurate, allocation-light inner products for the force reductions.

Measured by ``bench/reductions_cpu.py`` on one Pythia-70M embedding (25.8M fp32 elements, 2 CPU threads; see
``docs/benchmarks.md``): ``torch.dot`` in fp32 takes 4 ms but is off by 2.4e-6 relative; ``(w*u).sum(dtype=float64)``
is exact to 5e-13 but takes 115 ms. A row-blocked batched matmul sums ``ROW`` products in fp32 (short sums, so
accurate) and adds the per-row results in float64: 10 ms at 2.2e-10 relative error, with no full-size temporary.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements per row of the blocked dot product. 128 was the fastest of 64..4096 on CPU and gives ~1e-10 error.
ROW = 128

_EXACT_DTYPES = (torch.float32, torch.float64)


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
    if main:
        rows = torch.bmm(a[:main].view(-1, 1, ROW), b[:main].view(-1, ROW, 1))
        total = rows.sum(dtype=torch.float64)
    else:
        total = torch.zeros((), dtype=torch.float64, device=a.device)
    if main < n:
        total = total + torch.dot(a[main:].double(), b[main:].double())
    return total


def sq_norm_exact(t: Tensor) -> Tensor:
    """‖t‖² accumulated in float64 (~1e-12 relative): the read-out's ‖W‖², taken on log steps only.

    The interval residual is ‖W‖²_now − ‖W‖²_start − Σ forces, a difference of two nearly equal norms: the fp32 rows
    of :func:`dot_f64` (~1e-8 relative on a small tensor) would bury the fp32 storage rounding it exists to show.
    ~3 ms per million elements on 2 CPU threads; a bandwidth-bound pass on a GPU.
    """
    return torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float64).square()


def reduce3(w: Tensor, u: Tensor) -> Tensor:
    """The three per-tensor reductions ``[⟨w,u⟩, ‖u‖², ‖w‖²]`` as a float64 vector of length 3, all in the
    arithmetic of the parameter's dtype (Muon's u is bf16 whatever W is: float64 W keeps float64 sums)."""
    dtype = reduction_dtype(w.dtype)
    if u.dtype != dtype and not torch.compiler.is_compiling():
        u = u.to(dtype)  # once, not in each of the two dot products that read it (Muon's bf16 O)
    return torch.stack((dot_f64(w, u, dtype), dot_f64(u, u, dtype), dot_f64(w, w, dtype)))
