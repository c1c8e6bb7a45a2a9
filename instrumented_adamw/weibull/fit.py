"""Two-parameter Weibull fits of |W| with the papers' probability-plot protocol, on the tensor's device.

Protocol (``fit_weibull``): |w| with zeros dropped, sorted; Hazen positions F_i = (i − 0.5)/N; keep
``trim ≤ F_i ≤ 1 − trim`` (inclusive; trim = 0.1 is "mid-80"); ordinary least squares of y = ln(−ln(1 − F)) on
x = ln|w|; k = slope, λ = exp(−intercept/k), R² of that regression. ``center=True`` fits |w − mean(w)| instead.

``fit_weibull_histogram`` is the variant the papers' database was built with (1024 log10 bins, whole bins kept by
their middle CDF, mean subtracted first); it matches npm-weibull-py 0.4.0 to ≤ 5e-7 in k (``docs/weibull.md``).

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

from instrumented_adamw.kernels.reductions import ROW, sq_f64

#: Elements sorted at once: 2^25 fp32 values + the int64 indices torch.sort returns ≈ 400 MB of temporaries.
#: A Pythia-70M embedding (25.8M) sorts in one piece; a 4096×14336 matrix (58.7M) in two.
CHUNK = 1 << 25


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


def _sort_values(a: Tensor) -> Tensor:
    """Ascending sort of non-negative floats through their integer bit patterns.

    Why: for non-negative IEEE floats the bit pattern orders like the value, and torch sorts integers with a radix
    sort on CPU (0.63 s against 3.2 s for 25.8M fp32 values on 2 cores, see ``docs/benchmarks.md``); on CUDA both
    are radix sorts. The result is bitwise the same as ``torch.sort(a).values``.
    """
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return torch.sort(a.view(ints)).values.view(a.dtype)


def _sorted_chunks(a: Tensor, lo: int, hi: int, chunk: int):
    """Yield (first rank, sorted values) covering 1-based ranks lo..hi of ``a`` in order, ~``chunk`` at a time.

    Each chunk takes every element between its first and last order statistic (so ties across a boundary are
    handled) and offsets by the count strictly below, which fixes the ranks exactly.
    """
    if a.numel() <= chunk:
        yield lo, _sort_values(a)[lo - 1 : hi]
        return
    start = lo
    while start <= hi:
        end = min(hi, start + chunk - 1)
        v0, v1 = torch.kthvalue(a, start).values, torch.kthvalue(a, end).values
        offset = int((a < v0).sum())  # note: host sync; fitting is analysis, never inside step()
        part = _sort_values(a[(a >= v0) & (a <= v1)])
        yield start, part[start - 1 - offset : end - offset]
        start = end + 1


def fit_weibull(w: Tensor, trim: float = 0.1, chunk: int = CHUNK, *, center: bool = False) -> WeibullFit:
    """Fit Weibull(k, λ) to |w| with the Hazen / middle-(1−2·trim) protocol. ``trim=0.05`` is mid-90,
    ``trim=0`` the full-data fit. Runs on ``w``'s device; all sums are float64.

    ``center=True`` subtracts the matrix's sample mean first (the paper's App. A.1 pipeline step). Off by default:
    on this sample-level fit it moves k by ~2e-6 (at most 5e-5 over 64 draws of N(0, 0.02²) 512×2048), and
    without it the fit stays a function of the weights alone (what the monitor and ``fit_blocks`` have always
    reported). With it, ``rms`` and ``std_abs`` describe the centred values, and elements that are exactly zero
    *after* centring are dropped (so a pruned matrix's zeros become −mean and are kept: leave ``center`` off for
    sparse matrices)."""
    a, n, rms, std_abs = _abs_nonzero(w, "fit_weibull", center)
    lo, hi = hazen_rank_range(n, trim)
    if hi - lo + 1 < 3:
        raise ValueError(f"trim={trim} leaves {hi - lo + 1} points of {n}; need at least 3")
    sums = torch.zeros(5, dtype=torch.float64, device=a.device)  # Σx, Σy, Σxx, Σxy, Σyy
    for first, values in _sorted_chunks(a, lo, hi, chunk):
        y = _hazen_y(first, values.numel(), n, a.device)
        x = values.to(torch.float64).log_()
        sums += torch.stack((x.sum(), y.sum(), torch.dot(x, x), torch.dot(x, y), torch.dot(y, y)))
    sx, sy, sxx, sxy, syy = sums.tolist()
    return _ols(sx, sy, sxx, sxy, syy, hi - lo + 1, n, rms, std_abs)


def _abs_nonzero(
    w: Tensor, who: str, center: bool = False, dtype: torch.dtype | None = None
) -> tuple[Tensor, int, float, float]:
    """|w| (|w − mean(w)| with ``center``) without zeros, N, and the RMS and std of |·| of those values over all
    elements, zeros included. Works in fp32 or fp64 (``dtype`` forces one); bf16/fp16 values are exact in fp32."""
    w = w.detach()
    if w.is_complex():
        raise ValueError(f"{who} needs a real tensor; pass w.abs() for a complex one")
    if not w.is_floating_point():
        raise ValueError(f"{who} needs a floating-point tensor, got {w.dtype}")
    flat = w.reshape(-1)
    if dtype is not None:
        flat = flat.to(dtype)
    elif flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    total = flat.numel()
    if center and total:
        # The mean stays a 0-d float64 tensor (no host sync); subtracting it keeps flat's dtype.
        a = (flat - _sum_f64(flat) / total).abs_()
    else:
        a = flat.abs()
    if total:
        sum_sq = sq_f64(a)
        sum_abs = _sum_f64(a)
        n_nonzero = torch.count_nonzero(a)
        sum_sq, sum_abs, n = (v.item() for v in torch.stack((sum_sq, sum_abs, n_nonzero.double())))
        n = int(n)
        if not math.isfinite(sum_sq):  # a NaN counts as nonzero but no comparison keeps it: N and the sample part
            raise ValueError(f"{who} needs finite weights: the tensor holds NaN or inf")
    else:
        sum_sq = sum_abs = 0.0
        n = 0
    if n < 3:
        raise ValueError(f"{who} needs at least 3 nonzero elements, got {n}")
    if n < total:
        a = a[a > 0]
    mean_sq, mean_abs = sum_sq / total, sum_abs / total
    return a, n, math.sqrt(mean_sq), math.sqrt(max(mean_sq - mean_abs * mean_abs, 0.0))


class _HazenCache:
    """Recently used y = ln(−ln(1 − F)) vectors, keyed by (device, first rank, count, N), within an element budget.

    Why: a model's matrices share a few shapes (Pythia-70M: 26 matrices, 5 shapes) and a monitor refits the same
    matrices every few hundred steps, so the float64 transcendental pass over the ranks is usually a repeat.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: dict[tuple, Tensor] = {}

    def get(self, first: int, count: int, n: int, device: torch.device) -> Tensor:
        key = (device, first, count, n)
        y = self._items.pop(key, None)
        if y is None:
            ranks = torch.arange(first, first + count, dtype=torch.float64, device=device)
            y = ranks.sub_(0.5).div_(-n).log1p_().neg_().log_()
        self._items[key] = y  # most recent last
        held = sum(v.numel() for v in self._items.values())
        while held > self.budget and len(self._items) > 1:
            oldest = next(iter(self._items))
            held -= self._items.pop(oldest).numel()
        return y

    def clear(self) -> None:
        self._items.clear()


#: Up to 2^25 float64 values (256 MB) of Hazen y vectors are kept between fits.
HAZEN_CACHE = _HazenCache(budget=1 << 25)


def _sum_f64(a: Tensor) -> Tensor:
    """Σa as float64: fp32 sums over rows of ``ROW`` elements, float64 across rows (cf. ``reductions.dot_f64``)."""
    main = a.numel() - a.numel() % ROW
    total = a[:main].reshape(-1, ROW).sum(dim=1).sum(dtype=torch.float64)
    return total + a[main:].sum(dtype=torch.float64)


def _hazen_y(first: int, count: int, n: int, device: torch.device) -> Tensor:
    """y_i = ln(−ln(1 − F_i)) at the Hazen positions F_i = (i − 0.5)/n for ranks first .. first+count−1."""
    return HAZEN_CACHE.get(first, count, n, device)


def _ols(sx, sy, sxx, sxy, syy, m, n, rms, std_abs) -> WeibullFit:
    xbar, ybar = sx / m, sy / m
    cxx, cxy, cyy = sxx - m * xbar * xbar, sxy - m * xbar * ybar, syy - m * ybar * ybar
    if not cxx > 1e-12 * max(abs(sxx), 1e-300):
        raise ValueError("the kept |w| are all equal (e.g. a norm weight at init): a Weibull fit needs spread")
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
    return WeibullFit(k, lam, r2, int(round(m)), n, math.sqrt(var_k), math.sqrt(max(var_lam, 0.0)), rms, std_abs)


# ---------------------------------------------------------------------------------------------- histogram
#: Binning of the histogram variant: 1024 bins uniform in log10|w| over [−12, 2], as npm-weibull-py stores them.
HIST_BINS = 1024
HIST_LOG10_RANGE = (-12.0, 2.0)
#: How bins straddling the trim bounds are read: "midpoint" (whole bins, the database's rule) or "fractional".
HIST_EDGES = ("midpoint", "fractional")


def fit_weibull_histogram(
    w: Tensor,
    trim: float = 0.1,
    bins: int = HIST_BINS,
    log10_range: tuple[float, float] = HIST_LOG10_RANGE,
    edge: str = "midpoint",
    *,
    center: bool = True,
) -> WeibullFit:
    """The histogram variant: counts in log10-uniform bins, CDF at each bin's middle, count-weighted LSQ.

    This is the representation the papers' database stores (a 1024-bin histogram per matrix, not the weights),
    so fits made from that database can only be reproduced this way; the defaults are that pipeline. Each bin j
    spans the CDF interval [C_{j−1}/N, C_j/N]; its point is x = ln of the bin's geometric centre and
    y = ln(−ln(1 − F)) at the middle F of that interval, weighted by its count.

    ``edge`` says what happens to the bins that straddle the trim bounds:

    * ``"midpoint"`` (default): a bin is kept whole when its middle F lies in [trim, 1 − trim], else dropped. This
      is npm-weibull-py's ``weibull_fit`` rule, used for the published database; we match it to ≤ 5e-7 in k. The
      price: k moves by ~3e-3 peak to peak as the scale slides bin edges across the trim bounds
      (``docs/weibull.md``), where :func:`fit_weibull` does not move at all.
    * ``"fractional"``: the part of a bin's CDF interval inside [trim, 1 − trim] is kept, with its own middle F
      and its share of the count. Better behaved (within ~4e-4 of :func:`fit_weibull` at every scale), but not
      what the database used.

    ``center=True`` (default) subtracts the matrix's sample mean before histogramming, as the paper's App. A.1
    pipeline does (npm-weibull-py's ``extract_to_histogram`` does not: give it ``w - w.mean()`` to compare).
    The mean and the log10 are float64 here (the library's log10 is fp32; this moves a few elements across a
    bin edge, ≤ 5e-7 in k on the parity tensors).

    Zeros are dropped from N, as in the library. Tiny and huge values are kept: a nonzero |w| below 10^lo or
    above 10^hi of ``log10_range`` still counts in N and shifts the CDF of every bin, the sample-level definition
    of the papers (the library silently drops |w| < 1e-12 and > 100 from N). If they are so many that they reach
    into the kept band, the fit raises rather than mis-ranking them. ``n`` in the result is the number of
    elements the kept (partial) bins represent.
    """
    if edge not in HIST_EDGES:
        raise ValueError(f"edge must be one of {HIST_EDGES}, got {edge!r}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    lo10, hi10 = log10_range
    if not (bins >= 2 and hi10 > lo10):
        raise ValueError(f"need bins >= 2 and an increasing log10_range, got {bins} bins over {log10_range}")
    a, n, rms, std_abs = _abs_nonzero(w, "fit_weibull_histogram", center, dtype=torch.float64)
    l10 = a.log10_()
    below = (l10 < lo10).sum()
    above = (l10 > hi10).sum()
    counts = torch.histc(l10, bins=bins, min=lo10, max=hi10)
    host = torch.cat((counts, torch.stack((below, above)).double())).cpu().numpy()
    counts, n_below, n_above = host[:bins], host[bins], host[bins + 1]
    if n_below / n > trim or n_above / n > trim:
        raise ValueError(
            f"{int(n_below)} elements below 1e{lo10:g} and {int(n_above)} above 1e{hi10:g} of {n}: they reach into "
            f"the kept band [trim={trim}, {1 - trim}]; widen log10_range or use fit_weibull"
        )
    upper = (n_below + np.cumsum(counts)) / n
    lower = upper - counts / n
    if edge == "fractional":
        f_lo, f_hi = np.clip(lower, trim, 1 - trim), np.clip(upper, trim, 1 - trim)
        weight = (f_hi - f_lo) * n
        f_mid = (f_lo + f_hi) / 2
    else:
        f_mid = (lower + upper) / 2
        weight = np.where((f_mid >= trim) & (f_mid <= 1 - trim), counts, 0.0)
    keep = (weight > 0) & (counts > 0)
    if keep.sum() < 3:
        raise ValueError(f"only {int(keep.sum())} histogram bins fall in the kept band; need at least 3")
    step = (hi10 - lo10) / bins
    x = math.log(10.0) * (lo10 + step * (np.arange(bins)[keep] + 0.5))
    y = np.log(-np.log1p(-f_mid[keep]))
    wt = weight[keep]
    m = wt.sum()
    fit = _ols(
        (wt * x).sum(), (wt * y).sum(), (wt * x * x).sum(), (wt * x * y).sum(), (wt * y * y).sum(), m, n, rms, std_abs
    )
    return fit


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
