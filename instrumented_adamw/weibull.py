"""Two-parameter Weibull fits of |W| with the papers' probability-plot protocol, on the tensor's device.

Protocol (``fit_weibull``): |w| with zeros dropped, sorted; Hazen positions F_i = (i − 0.5)/N; keep
``trim ≤ F_i ≤ 1 − trim`` (inclusive; trim = 0.1 is "mid-80"); ordinary least squares of y = ln(−ln(1 − F)) on
x = ln|w|; k = slope, λ = exp(−intercept/k), R² of that regression. No mean subtraction.

Memory: only the regression sums are needed, so the sorted values are produced chunk by chunk (elements between
two order statistics found with ``kthvalue``) and folded into float64 sums; a 4096×14336 matrix needs one
|w| copy plus one chunk, never a full sort with int64 indices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import integrate, special
from torch import Tensor

#: Elements sorted at once. 2^24 fp32 values + int64 indices ≈ 200 MB of temporaries.
CHUNK = 1 << 24


@dataclass(frozen=True)
class WeibullFit:
    """Result of one fit. ``se_k``/``se_lam`` are OLS standard errors (λ's by the delta method)."""

    k: float
    lam: float
    r2: float
    n: int  # points in the regression
    n_nonzero: int  # N: nonzero elements
    se_k: float
    se_lam: float
    rms: float  # √mean(w²) over all elements, zeros included
    std_abs: float  # standard deviation of |w| (a different quantity from the RMS)

    @property
    def lam_over_rms(self) -> float:
        return self.lam / self.rms

    @property
    def gamma_bridge_lam(self) -> float:
        """λ predicted from the RMS for a true Weibull of shape k: RMS/√Γ(1+2/k)."""
        return self.rms / math.sqrt(math.gamma(1 + 2 / self.k))

    @property
    def gamma_closure_std(self) -> float:
        """σ_|w| a true Weibull(k, λ) would have: λ√(Γ(1+2/k) − Γ(1+1/k)²); compare with ``std_abs``."""
        return self.lam * math.sqrt(math.gamma(1 + 2 / self.k) - math.gamma(1 + 1 / self.k) ** 2)

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out.update(
            lam_over_rms=self.lam_over_rms,
            gamma_bridge_lam=self.gamma_bridge_lam,
            gamma_closure_std=self.gamma_closure_std,
        )
        return out


def hazen_rank_range(n: int, trim: float) -> tuple[int, int]:
    """1-based ranks [lo, hi] with trim ≤ (i − 0.5)/n ≤ 1 − trim, decided by the same float64 expression a
    vectorised reference evaluates, so boundary ties resolve identically."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")

    def position(i: int) -> float:
        return (np.float64(i) - 0.5) / np.float64(n)

    lo = max(1, math.ceil(trim * n + 0.5) - 1)
    while lo <= n and position(lo) < trim:
        lo += 1
    hi = min(n, math.floor((1 - trim) * n + 0.5) + 1)
    while hi >= 1 and position(hi) > 1 - trim:
        hi -= 1
    return lo, hi


def _sorted_chunks(a: Tensor, lo: int, hi: int, chunk: int):
    """Yield (first rank, sorted values) covering 1-based ranks lo..hi of ``a`` in order, ~``chunk`` at a time.

    Each chunk takes every element between its first and last order statistic (so ties across a boundary are
    handled) and offsets by the count strictly below, which fixes the ranks exactly.
    """
    if a.numel() <= chunk:
        yield lo, torch.sort(a).values[lo - 1 : hi]
        return
    start = lo
    while start <= hi:
        end = min(hi, start + chunk - 1)
        v0, v1 = torch.kthvalue(a, start).values, torch.kthvalue(a, end).values
        offset = int((a < v0).sum())  # note: host sync; fitting is analysis, never inside step()
        part = torch.sort(a[(a >= v0) & (a <= v1)]).values
        yield start, part[start - 1 - offset : end - offset]
        start = end + 1


def fit_weibull(w: Tensor, trim: float = 0.1, chunk: int = CHUNK) -> WeibullFit:
    """Fit Weibull(k, λ) to |w| with the Hazen / middle-(1−2·trim) protocol. ``trim=0.05`` is mid-90,
    ``trim=0`` the full-data fit."""
    w = w.detach()
    if w.is_complex():
        raise ValueError("fit_weibull needs a real tensor; pass w.abs() for a complex one")
    flat = w.reshape(-1)
    rms = torch.sqrt(torch.mean(flat.double() ** 2)).item() if flat.numel() else float("nan")
    a = flat.abs()
    a = a[a > 0]
    n = a.numel()
    if n < 3:
        raise ValueError(f"fit_weibull needs at least 3 nonzero elements, got {n}")
    std_abs = torch.std(flat.abs().double(), correction=0).item()  # over all elements, like the RMS
    lo, hi = hazen_rank_range(n, trim)
    if hi - lo + 1 < 3:
        raise ValueError(f"trim={trim} leaves {hi - lo + 1} points of {n}; need at least 3")
    sums = torch.zeros(5, dtype=torch.float64, device=a.device)  # Σx, Σy, Σxx, Σxy, Σyy
    for first, values in _sorted_chunks(a.float() if a.dtype != torch.float64 else a, lo, hi, chunk):
        ranks = torch.arange(first, first + values.numel(), dtype=torch.float64, device=a.device)
        y = torch.log(-torch.log1p(-(ranks - 0.5) / n))
        x = torch.log(values.double())
        sums += torch.stack((x.sum(), y.sum(), (x * x).sum(), (x * y).sum(), (y * y).sum()))
    sx, sy, sxx, sxy, syy = sums.tolist()
    m = hi - lo + 1
    return _ols(sx, sy, sxx, sxy, syy, m, n, rms, std_abs)


def _ols(sx, sy, sxx, sxy, syy, m, n, rms, std_abs) -> WeibullFit:
    xbar, ybar = sx / m, sy / m
    cxx, cxy, cyy = sxx - m * xbar * xbar, sxy - m * xbar * ybar, syy - m * ybar * ybar
    k = cxy / cxx
    b = ybar - k * xbar
    lam = math.exp(-b / k)
    r2 = cxy * cxy / (cxx * cyy)
    s2 = max(cyy - k * cxy, 0.0) / (m - 2)
    var_k = s2 / cxx
    var_b = s2 * (1 / m + xbar * xbar / cxx)
    cov_bk = -xbar * s2 / cxx
    dl_db, dl_dk = -lam / k, lam * b / (k * k)
    var_lam = dl_db**2 * var_b + dl_dk**2 * var_k + 2 * dl_db * dl_dk * cov_bk
    return WeibullFit(k, lam, r2, m, n, math.sqrt(var_k), math.sqrt(max(var_lam, 0.0)), rms, std_abs)


# ---------------------------------------------------------------------------------------------- anchors
def half_normal_anchor(trim: float = 0.1) -> tuple[float, float]:
    """(k₀, λ₀/σ): the population value of this protocol on a half-normal |w| (σ = RMS of w), by quadrature.

    In the large-N limit the Hazen positions fill [trim, 1 − trim] uniformly, so the OLS moments become integrals
    over F of x(F) = ln(√2·erfinv(F)) and y(F) = ln(−ln(1 − F)).
    """
    a, b = trim, 1 - trim

    def x(f):
        return math.log(math.sqrt(2.0) * special.erfinv(f))

    def y(f):
        return math.log(-math.log1p(-f))

    def mean(g):
        return integrate.quad(g, a, b, limit=200, epsabs=1e-13, epsrel=1e-12)[0] / (b - a)

    mx, my = mean(x), mean(y)
    cxx = mean(lambda f: (x(f) - mx) ** 2)
    cxy = mean(lambda f: (x(f) - mx) * (y(f) - my))
    k = cxy / cxx
    lam = math.exp(-(my - k * mx) / k)
    return k, lam
