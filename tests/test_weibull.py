"""Weibull probability-plot fits: anchors by quadrature, recovery, and parity with an independent numpy fit."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import signal
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from instrumented_adamw.weibull.fit import (
    CHUNK,
    HAZEN_CACHE,
    HIST_BINS,
    HIST_LOG10_RANGE,
    WeibullFit,
    _HazenCache,
    _sorted_chunks,
    fit_weibull,
    fit_weibull_histogram,
    half_normal_anchor,
    hazen_rank_range,
)


def hazen_points(w: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
    """The regression's points by full sort and vectorised Hazen mask: x = ln|w|, y = ln(−ln(1 − F)), zeros dropped."""
    a = np.sort(np.abs(w.astype(np.float64)))
    a = a[a > 0]
    n = a.size
    f = (np.arange(1, n + 1, dtype=np.float64) - 0.5) / n
    keep = (f >= trim) & (f <= 1 - trim)
    return np.log(a[keep]), np.log(-np.log1p(-f[keep]))


def numpy_fit(w: np.ndarray, trim: float) -> tuple[float, float, float]:
    """Independent float64 reference: full sort, vectorised Hazen mask, np.polyfit."""
    x, y = hazen_points(w, trim)
    k, b = np.polyfit(x, y, 1)
    r2 = np.corrcoef(x, y)[0, 1] ** 2
    return k, math.exp(-b / k), r2


def test_half_normal_anchors_by_quadrature():
    # The framework paper's App. A.1 anchors, to the seven digits it prints (the library rounds k0 to 1.205).
    k0, l0 = half_normal_anchor(0.1)
    assert k0 == pytest.approx(1.2054343, abs=5e-8) and l0 == pytest.approx(0.8874870, abs=5e-8)
    k90, l90 = half_normal_anchor(0.05)
    assert k90 == pytest.approx(1.1909226, abs=5e-8) and l90 == pytest.approx(0.8808879, abs=5e-8)
    # The Γ-bridge at k0 is not the fitted λ/σ: 0.8176 vs 0.8875 (a half-normal is not a Weibull).
    assert 1 / math.sqrt(math.gamma(1 + 2 / k0)) == pytest.approx(0.8176, abs=1e-4)


def test_half_normal_samples_reproduce_the_anchor():
    k0, l0 = half_normal_anchor(0.1)
    w = 0.02 * torch.randn(1_000_000, generator=torch.Generator().manual_seed(3))
    fit = fit_weibull(w)
    assert fit.k == pytest.approx(k0, abs=2e-3)
    assert fit.lam_over_rms == pytest.approx(l0, abs=2e-3)
    assert fit.r2 > 0.99 and fit.n_nonzero == 1_000_000


@pytest.mark.parametrize(("k", "lam"), [(1.5, 0.03), (0.8, 2.0), (3.0, 0.001)])
def test_exact_weibull_samples_recover_parameters(k, lam):
    g = torch.Generator().manual_seed(1)
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    w = lam * (-torch.log1p(-u)) ** (1 / k)
    fit = fit_weibull(w)
    assert fit.k == pytest.approx(k, rel=5e-3)
    assert fit.lam == pytest.approx(lam, rel=5e-3)
    assert fit.r2 > 0.999
    # For a true Weibull the Γ-bridge and Γ-closure agree with the measurements.
    assert fit.gamma_bridge_lam == pytest.approx(fit.lam, rel=1e-2)
    assert fit.gamma_closure_std == pytest.approx(fit.std_abs, rel=1e-2)


@pytest.mark.parametrize("trim", [0.1, 0.05, 0.0])
@pytest.mark.parametrize("n", [10, 1001, 54321])
def test_matches_independent_numpy_reference(trim, n):
    w = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.05
    w[::17] = 0.0  # zeros are dropped
    k, lam, r2 = numpy_fit(w, trim)
    fit = fit_weibull(torch.from_numpy(w), trim=trim)
    assert fit.k == pytest.approx(k, rel=1e-9)
    assert fit.lam == pytest.approx(lam, rel=1e-9)
    assert fit.r2 == pytest.approx(r2, rel=1e-9)
    assert fit.n_nonzero == np.count_nonzero(w)


def test_chunked_sort_equals_full_sort_even_with_ties():
    # bf16 has few distinct values: many ties straddle the chunk boundaries.
    w = torch.randn(200_000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    full = fit_weibull(w)
    chunked = fit_weibull(w, chunk=7_777)
    assert chunked.k == pytest.approx(full.k, rel=1e-12)
    assert chunked.lam == pytest.approx(full.lam, rel=1e-12)
    assert chunked.n == full.n


def test_hazen_rank_range_is_inclusive():
    # n = 10: F = 0.05, 0.15, ..., 0.95 -> keep 0.15 .. 0.85; n = 20: F = 0.1 and 0.9 lie exactly on the bounds.
    assert hazen_rank_range(10, 0.1) == (2, 9)
    lo, hi = hazen_rank_range(20, 0.1)
    f = (np.arange(1, 21) - 0.5) / 20
    keep = np.nonzero((f >= 0.1) & (f <= 0.9))[0] + 1
    assert (lo, hi) == (keep[0], keep[-1])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 3 nonzero"):
        fit_weibull(torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="trim"):
        fit_weibull(torch.randn(100), trim=0.6)
    with pytest.raises(ValueError, match="real tensor"):
        fit_weibull(torch.randn(10, dtype=torch.complex64))


@contextlib.contextmanager
def cpu_deadline(seconds: float):
    """Raise TimeoutError in the block once this process has spent ``seconds`` of CPU time in it (SIGVTALRM, handled
    in the main thread): a loop that does not end fails the test instead of hanging it. CPU time, not wall time, so a
    busy or paused machine does not fail a block that is only waiting."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s of CPU time")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def hazen_reference(n: int, trim: float) -> tuple[int, int]:
    """[lo, hi] by the vectorised float64 mask trim ≤ (i − 0.5)/n ≤ 1 − trim. For large n the mask is evaluated only
    on ranks ±3 around the exact (rational) bounds, and must switch inside that window."""
    if n <= 100_000:
        f = (np.arange(1, n + 1, dtype=np.float64) - 0.5) / n
        kept = np.flatnonzero((f >= trim) & (f <= 1 - trim)) + 1
        return int(kept[0]), int(kept[-1])
    t, half = Fraction(trim), Fraction(1, 2)
    lo_ranks = np.arange(math.ceil(t * n + half) - 3, math.ceil(t * n + half) + 4)
    hi_ranks = np.arange(math.floor((1 - t) * n + half) - 3, math.floor((1 - t) * n + half) + 4)
    above = (lo_ranks.astype(np.float64) - 0.5) / n >= trim
    below = (hi_ranks.astype(np.float64) - 0.5) / n <= 1 - trim
    assert not above[0] and above[-1] and below[0] and not below[-1]
    return int(lo_ranks[np.argmax(above)]), int(hi_ranks[len(below) - 1 - np.argmax(below[::-1])])


@pytest.mark.parametrize(
    ("n", "trim"),
    [
        (3, 0.0),
        (5, 0.25),
        (10, 0.1),
        (20, 0.1),  # F = 0.1 and 0.9 lie on the bounds
        (45, 0.3),  # F = 0.7 at rank 32: within rounding of 1 − trim, and kept
        (1001, 0.05),
        (54321, 1 / 3),
        (4096 * 14336, 0.1),  # a 4096×14336 matrix (58.7M elements)
        (4096 * 14336, 0.05),
        (10**12, 0.1),
        (10**12, 0.3),
    ],
)
def test_boundary_ranks_are_exact_and_immediate(n, trim):
    # The ranks come from a closed form corrected by a step or two of the float64 test, never by walking the ranks:
    # a walk over 10^12 ranks (or one that never ends) fails the deadline instead of hanging the suite.
    with cpu_deadline(2.0):
        got = hazen_rank_range(n, trim)
    assert got == hazen_reference(n, trim)


def test_trim_must_be_below_one_half():
    with pytest.raises(ValueError, match="trim must be in"):
        hazen_rank_range(10, 0.5)  # 0.5 would keep only F = 0.5 exactly: the bound is exclusive
    with pytest.raises(ValueError, match="trim must be in"):
        fit_weibull(torch.randn(100, generator=torch.Generator().manual_seed(0)), trim=0.5)


def test_three_nonzero_elements_are_enough_and_two_kept_points_are_not():
    # N = 3: F = 1/6, 1/2, 5/6 all lie in [0.1, 0.9], so the smallest legal sample is a 3-point regression.
    w = np.array([0.0, 0.3, -1.2, 0.0, 0.7])
    fit = fit_weibull(torch.from_numpy(w))
    x, y = hazen_points(w, 0.1)
    reg = stats.linregress(x, y)
    assert fit.n == fit.n_nonzero == 3
    assert fit.k == pytest.approx(reg.slope, rel=1e-12)
    assert fit.lam == pytest.approx(math.exp(-reg.intercept / reg.slope), rel=1e-12)
    assert fit.se_k == pytest.approx(reg.stderr, rel=1e-9)  # one degree of freedom: s² = RSS / (3 − 2)
    with pytest.raises(ValueError, match="at least 3 nonzero elements, got 2"):
        fit_weibull(torch.tensor([0.0, 0.3, -1.2, 0.0]))
    with pytest.raises(ValueError, match="at least 3 nonzero elements, got 0"):
        fit_weibull(torch.empty(0))
    # N = 5, trim 0.25: F = 0.3, 0.5, 0.7 kept (3 points, a fit); N = 4: F = 0.375, 0.625 (2 points, an error).
    assert fit_weibull(torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6]), trim=0.25).n == 3
    with pytest.raises(ValueError, match="leaves 2 points of 4"):
        fit_weibull(torch.tensor([0.1, 0.2, 0.4, 0.8]), trim=0.25)


def test_standard_errors_match_an_independent_ols():
    # se_k: the OLS slope's standard error (scipy's linregress). se_lam: λ = exp(−b/k) by the delta method, checked
    # without its formula: the same line written as y = k·(x − ln λ) has Jacobian J in (k, λ), and the Gauss-Newton
    # covariance s²·(JᵀJ)⁻¹ of that (exact) reparametrisation is the delta method's. ln|w| ≈ −4 here, far from 0, so
    # the intercept's variance and its covariance with the slope both weigh in.
    w = 0.02 * np.random.default_rng(11).standard_normal(50)
    fit = fit_weibull(torch.from_numpy(w))
    x, y = hazen_points(w, 0.1)
    m = x.size
    reg = stats.linregress(x, y)
    k, lam = reg.slope, math.exp(-reg.intercept / reg.slope)
    s2 = np.sum((y - reg.intercept - k * x) ** 2) / (m - 2)
    jac = np.column_stack((x - math.log(lam), np.full(m, -k / lam)))
    cov = s2 * np.linalg.inv(jac.T @ jac)
    assert fit.n == m == 40
    assert math.sqrt(cov[0, 0]) == pytest.approx(reg.stderr, rel=1e-9)  # the two references agree on se_k
    assert fit.se_k == pytest.approx(reg.stderr, rel=1e-9)
    assert fit.se_lam == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)
    assert 0 < fit.se_lam < 0.05 * fit.lam  # a small error on a well-determined scale


def test_kept_values_need_spread_relative_to_their_size():
    u = np.linspace(-1.0, 1.0, 101)
    # Within 1e-5 of 1: ln|w| ≈ 1e-5·u is tiny in absolute terms (Σx² ≈ 2e-9) but all spread, so it fits.
    near_one = 1.0 + 1e-5 * u
    k, lam, _ = numpy_fit(near_one, 0.1)
    fit = fit_weibull(torch.from_numpy(near_one))
    assert fit.k == pytest.approx(k, rel=1e-6) and fit.lam == pytest.approx(lam, rel=1e-12)
    # ln|w| = 1 + 2.7e-6·u: the kept points' variance is ~1.5e-12 of their mean square, tiny but over 100× what fp64
    # rounding of the sums can leave (~m·ε ≈ 1e-14): a genuine (steep) fit, not "all equal".
    tight = np.exp(1.0 + 2.7e-6 * u)
    x, y = hazen_points(tight, 0.1)
    xc = x - x.mean()
    assert np.mean(xc**2) / np.mean(x**2) == pytest.approx(1.5e-12, rel=0.05)
    fit = fit_weibull(torch.from_numpy(tight))
    assert fit.k == pytest.approx(np.dot(xc, y - y.mean()) / np.dot(xc, xc), rel=1e-2)
    with pytest.raises(ValueError, match="all equal"):
        fit_weibull(torch.full((101,), math.e, dtype=torch.float64))


@pytest.mark.parametrize("chunk", [1, 2, 7, 40, 79, 80, 100, 1000])
def test_chunk_pieces_are_consecutive_ranks_of_chunk_elements(chunk):
    # Ranks 11..90 of 100 values with many ties: the pieces are the next `chunk` ranks each (the last the rest), so a
    # sort never holds more than `chunk` ranks and no more pieces are made than that bound needs.
    a = torch.randint(1, 21, (100,), generator=torch.Generator().manual_seed(0)).float()
    lo, hi = 11, 90
    sizes = [chunk] * (80 // chunk) + ([80 % chunk] if 80 % chunk else [])
    pieces = list(itertools.islice(_sorted_chunks(a, lo, hi, chunk), len(sizes) + 1))  # a piece too many: fails
    assert [values.numel() for _, values in pieces] == sizes
    assert [first for first, _ in pieces] == list(itertools.accumulate([lo, *sizes[:-1]]))
    assert torch.equal(torch.cat([values for _, values in pieces]), torch.from_numpy(np.sort(a.numpy())[lo - 1 : hi]))


def test_sort_chunk_and_y_cache_have_the_documented_sizes():
    # CHUNK: a Pythia-70M embedding (50304×512, 25.8M) sorts in one piece, a 4096×14336 matrix (58.7M) in two, and a
    # piece's temporaries (fp32 values + the int64 indices of a sort) stay near 400 MB.
    assert math.ceil(50304 * 512 / CHUNK) == 1
    assert math.ceil(4096 * 14336 / CHUNK) == 2
    assert CHUNK * (4 + 8) == pytest.approx(400e6, rel=0.01)
    # The Hazen-y cache keeps up to 256 MiB of float64 between fits.
    assert HAZEN_CACHE.budget * 8 == 256 * 2**20


def test_hazen_cache_keeps_the_most_recent_vectors_within_its_budget():
    cpu = torch.device("cpu")

    def reference(first, count, n):
        return np.log(-np.log1p(-(np.arange(first, first + count) - 0.5) / n))

    cache = _HazenCache(budget=10)
    y1 = cache.get(1, 5, 100, cpu)
    np.testing.assert_allclose(y1.numpy(), reference(1, 5, 100), rtol=1e-14)
    y2 = cache.get(6, 5, 100, cpu)
    assert cache.get(1, 5, 100, cpu) is y1  # 10 elements: exactly the budget, both kept
    assert cache.get(6, 5, 100, cpu) is y2  # y2 is now the most recently used
    y3 = cache.get(11, 4, 100, cpu)  # 14 > 10: the least recently used (y1) goes, and 9 are left
    assert cache.get(6, 5, 100, cpu) is y2 and cache.get(11, 4, 100, cpu) is y3
    assert cache.get(1, 5, 100, cpu) is not y1  # recomputed

    pair = _HazenCache(budget=10)
    a = pair.get(1, 6, 100, cpu)
    b = pair.get(7, 6, 100, cpu)  # two vectors, 12 > 10: the older goes
    assert pair.get(7, 6, 100, cpu) is b and pair.get(1, 6, 100, cpu) is not a

    big = _HazenCache(budget=3)
    y = big.get(1, 5, 100, cpu)  # alone over the budget: the newest vector is always kept
    assert big.get(1, 5, 100, cpu) is y
    big.clear()
    fresh = big.get(1, 5, 100, cpu)
    assert fresh is not y and torch.equal(fresh, y)


def test_fit_record_is_frozen_and_its_dict_carries_the_documented_fields():
    fit = WeibullFit(k=2.0, lam=3.0, r2=0.9, n=10, n_nonzero=12, se_k=0.1, se_lam=0.2, rms=4.0, std_abs=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.k = 1.0
    d = fit.to_dict()
    assert list(d) == [  # weibull.jsonl's block fields (docs/monitor.md)
        "k", "lam", "r2", "n", "n_nonzero", "se_k", "se_lam", "rms", "std_abs",
        "lam_over_rms", "gamma_bridge_lam", "gamma_closure_std",
    ]  # fmt: skip
    # k = 2: Γ(1 + 2/k) = Γ(2) = 1 and Γ(1 + 1/k) = Γ(3/2) = √π/2.
    assert d["lam_over_rms"] == 0.75
    assert d["gamma_bridge_lam"] == pytest.approx(4.0, rel=1e-15)
    assert d["gamma_closure_std"] == pytest.approx(3.0 * math.sqrt(1 - math.pi / 4), rel=1e-14)
    # k = 1 (exponential): Γ(3) = 2, Γ(2) = 1.
    d = dataclasses.replace(fit, k=1.0).to_dict()
    assert d["gamma_bridge_lam"] == pytest.approx(4.0 / math.sqrt(2.0), rel=1e-15)
    assert d["gamma_closure_std"] == pytest.approx(3.0, rel=1e-15)


# ---------------------------------------------------------------------------------------------- histogram variant
@pytest.mark.parametrize("sigma", [0.005, 0.02, 0.0536, 0.2])
def test_histogram_variant_near_exact_on_half_normal(sigma):
    w = sigma * torch.randn(1_000_000, generator=torch.Generator().manual_seed(7))
    exact = fit_weibull(w, center=True)
    whole = fit_weibull_histogram(w)  # the database's pipeline: centred, whole bins
    assert whole.k == pytest.approx(exact.k, abs=2e-3)  # ±1.8e-3 at worst, as bin edges cross the trim bounds
    assert whole.lam == pytest.approx(exact.lam, rel=2e-3)
    frac = fit_weibull_histogram(w, edge="fractional")
    assert frac.k == pytest.approx(exact.k, abs=4e-4)
    assert frac.lam == pytest.approx(exact.lam, rel=2e-4)
    assert frac.n == pytest.approx(exact.n, abs=1)  # the kept band represents the same 80% of the elements


def test_whole_bin_k_moves_with_scale_exact_k_does_not():
    # docs/weibull.md: sliding σ across one bin width (×10^(14/1024)) moves the whole-bin k by ~3e-3 peak to peak,
    # the fractional reading by ~2e-4, the exact fit not at all (scale invariance up to fp32 rounding of σ·z).
    z = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    ks = {"exact": [], "midpoint": [], "fractional": []}
    for e in np.linspace(0.0, 14 / 1024, 12):
        w = (0.02 * 10**e) * z
        ks["exact"].append(fit_weibull(w).k)
        ks["midpoint"].append(fit_weibull_histogram(w, center=False).k)
        ks["fractional"].append(fit_weibull_histogram(w, edge="fractional", center=False).k)
    assert np.ptp(ks["exact"]) < 1e-8
    assert 1e-3 < np.ptp(ks["midpoint"]) < 5e-3
    assert np.ptp(ks["fractional"]) < 5e-4


def numpy_histogram_fit(w: np.ndarray, trim: float) -> tuple[float, float]:
    """Independent numpy reading of the whole-bin ('midpoint') histogram protocol."""
    a = np.abs(w.astype(np.float64))
    a = a[a > 0]
    counts, edges = np.histogram(np.log10(a), bins=1024, range=(-12.0, 2.0))
    upper = np.cumsum(counts) / a.size
    mid = upper - counts / (2 * a.size)
    keep = (counts > 0) & (mid >= trim) & (mid <= 1 - trim)
    x = np.log(10.0) * (edges[:-1] + edges[1:])[keep] / 2
    y = np.log(-np.log1p(-mid[keep]))
    k, b = np.polyfit(x, y, 1, w=np.sqrt(counts[keep]))
    return k, math.exp(-b / k)


def test_histogram_default_is_centred_whole_bins_matching_numpy_reading():
    w = np.random.default_rng(5).standard_normal(300_000) * 0.03 + 4e-4  # a visible mean
    fit = fit_weibull_histogram(torch.from_numpy(w))
    k, lam = numpy_histogram_fit(w - w.mean(), 0.1)
    assert fit.k == pytest.approx(k, rel=1e-9) and fit.lam == pytest.approx(lam, rel=1e-9)
    raw = fit_weibull_histogram(torch.from_numpy(w), edge="midpoint", center=False)
    k, lam = numpy_histogram_fit(w, 0.1)
    assert raw.k == pytest.approx(k, rel=1e-9) and raw.lam == pytest.approx(lam, rel=1e-9)
    assert abs(raw.k - fit.k) > 1e-4  # centring is not a no-op here


def test_center_subtracts_the_matrix_mean():
    g = torch.Generator().manual_seed(4)
    z = 0.02 * torch.randn(400, 500, generator=g, dtype=torch.float64)
    shifted = z + 0.02  # a mean of one standard deviation: |w| is no longer half-normal
    k0, l0 = half_normal_anchor()
    centred = fit_weibull(shifted, center=True)
    ref = fit_weibull(shifted - shifted.mean())
    assert centred.k == pytest.approx(ref.k, rel=1e-12) and centred.lam == pytest.approx(ref.lam, rel=1e-12)
    assert centred.rms == pytest.approx(float(shifted.std(unbiased=False)), rel=1e-12)  # RMS of what was fitted
    assert centred.k == pytest.approx(k0, abs=5e-3) and fit_weibull(shifted).k > k0 + 0.05
    hist = fit_weibull_histogram(shifted)
    assert hist.k == pytest.approx(fit_weibull_histogram(shifted - shifted.mean(), center=False).k, rel=1e-12)
    # On a zero-mean Gaussian matrix the exact fit barely notices (docs/weibull.md: ~2e-6, at most 5e-5).
    assert abs(fit_weibull(z, center=True).k - fit_weibull(z).k) < 1e-4
    # bf16 and strided inputs are centred in fp32/fp64, not in their own precision.
    b = shifted.to(torch.bfloat16)
    assert fit_weibull(b, center=True).k == pytest.approx(fit_weibull(b.float(), center=True).k, rel=1e-12)
    assert fit_weibull(shifted.t()[::2], center=True).k == pytest.approx(
        fit_weibull(shifted.t()[::2].contiguous(), center=True).k, rel=1e-12
    )


def test_histogram_keeps_tiny_and_huge_values_in_n():
    # |w| < 1e-12 lies below the first bin; it still counts in N and shifts every bin's CDF. Moving those elements
    # to just inside the first bin changes nothing (both are below the kept band); dropping them changes the fit.
    w = 0.02 * torch.randn(200_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    w[:4000] = 1e-14
    w[4000:5000] = 1e3  # above the last bin (|w| > 100)
    kept = fit_weibull_histogram(w, center=False)
    moved = w.clone()
    moved[:4000] = 1.0001e-12
    moved[4000:5000] = 99.0
    assert kept.k == pytest.approx(fit_weibull_histogram(moved, center=False).k, rel=1e-12)
    assert kept.n_nonzero == 200_000
    dropped = fit_weibull_histogram(w[5000:], center=False)
    assert abs(dropped.k - kept.k) > 1e-3
    # Too many of them reach into the kept band: an error, not a silent mis-ranking.
    with pytest.raises(ValueError, match="above 1e2"):
        fit_weibull_histogram(1e3 * (1 + torch.rand(1000, generator=torch.Generator().manual_seed(0))))
    with pytest.raises(ValueError, match="edge"):
        fit_weibull_histogram(torch.randn(100), edge="nearest")


def bin_centre_values(bins: int, log10_range: tuple[float, float], index: np.ndarray, count: int) -> np.ndarray:
    """``count`` copies of |w| at the log10 centre of each bin in ``index`` (far from any edge: no binning doubt)."""
    step = (log10_range[1] - log10_range[0]) / bins
    return np.repeat(10.0 ** (log10_range[0] + step * (index + 0.5)), count)


def weighted_line(x: np.ndarray, f: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """(k, λ) of the count-weighted least-squares line of y = ln(−ln(1 − F)) on x."""
    k, b = np.polyfit(x, np.log(-np.log1p(-f)), 1, w=np.sqrt(weight))
    return k, math.exp(-b / k)


def test_histogram_keeps_a_bin_whose_middle_cdf_lies_exactly_on_a_trim_bound():
    # 8 bins of 128 elements: middle F = 1/16, 3/16, ..., 15/16, all exact in binary. With trim = 1/16 the outer two
    # middles lie exactly on the bounds, and [trim, 1 − trim] is inclusive: all 8 bins are kept.
    index = np.arange(600, 840, 30)
    step = (HIST_LOG10_RANGE[1] - HIST_LOG10_RANGE[0]) / HIST_BINS
    w = bin_centre_values(HIST_BINS, HIST_LOG10_RANGE, index, 128)
    fit = fit_weibull_histogram(torch.from_numpy(w), trim=1 / 16, center=False)
    k, lam = weighted_line(
        math.log(10.0) * (HIST_LOG10_RANGE[0] + step * (index + 0.5)), np.arange(1, 16, 2) / 16, 128 * np.ones(8)
    )
    assert fit.n == 1024
    assert fit.k == pytest.approx(k, rel=1e-12) and fit.lam == pytest.approx(lam, rel=1e-12)


def test_histogram_needs_three_kept_bins():
    index = np.array([500, 560, 620, 680, 740])
    step = (HIST_LOG10_RANGE[1] - HIST_LOG10_RANGE[0]) / HIST_BINS
    x = math.log(10.0) * (HIST_LOG10_RANGE[0] + step * (index + 0.5))
    # 5 bins of 200: middle F = 0.1, 0.3, 0.5, 0.7, 0.9; trim = 0.2 keeps exactly three, enough for a fit.
    five = torch.from_numpy(bin_centre_values(HIST_BINS, HIST_LOG10_RANGE, index, 200))
    fit = fit_weibull_histogram(five, trim=0.2, center=False)
    k, lam = weighted_line(x[1:4], np.array([0.3, 0.5, 0.7]), np.full(3, 200.0))
    assert fit.n == 600
    assert fit.k == pytest.approx(k, rel=1e-12) and fit.lam == pytest.approx(lam, rel=1e-12)
    # 4 bins of 250: middle F = 0.125, 0.375, 0.625, 0.875; trim = 0.2 keeps two. The outer bins are not empty, but
    # a bin outside the band is not a point of the fit.
    four = torch.from_numpy(bin_centre_values(HIST_BINS, HIST_LOG10_RANGE, index[:4], 250))
    with pytest.raises(ValueError, match="only 2 histogram bins"):
        fit_weibull_histogram(four, trim=0.2, center=False)


def test_histogram_range_edges_belong_to_the_end_bins():
    # |w| exactly at 10^lo or 10^hi (1 and 100 here: log10 is exact) lies in the first or last bin (histc's range is
    # closed), not below or above the range: counted once in the CDF, and not seen by the "outside the range" guard
    # even when more than trim of the elements sit on the top edge.
    bins, log10_range = 64, (0.0, 2.0)
    assert torch.tensor([1.0, 100.0], dtype=torch.float64).log10().tolist() == list(log10_range)
    step = (log10_range[1] - log10_range[0]) / bins
    index = np.arange(4, 52, 3)  # 16 interior bins of 50
    w = np.concatenate((np.ones(50), bin_centre_values(bins, log10_range, index, 50), np.full(150, 100.0)))
    fit = fit_weibull_histogram(torch.from_numpy(w), trim=0.1, bins=bins, log10_range=log10_range, center=False)
    counts = np.zeros(bins)
    counts[0], counts[index], counts[-1] = 50, 50, 150
    upper = np.cumsum(counts) / w.size
    f_mid = upper - counts / (2 * w.size)
    keep = (counts > 0) & (f_mid >= 0.1) & (f_mid <= 0.9)
    x = math.log(10.0) * (log10_range[0] + step * (np.arange(bins) + 0.5))
    k, lam = weighted_line(x[keep], f_mid[keep], counts[keep])
    assert fit.n_nonzero == 1000 and fit.n == 750
    assert fit.k == pytest.approx(k, rel=1e-12) and fit.lam == pytest.approx(lam, rel=1e-12)


def test_histogram_validates_trim_bins_and_range_with_the_stated_bounds():
    w = 0.02 * torch.randn(10_000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with pytest.raises(ValueError, match="trim must be in"):
        fit_weibull_histogram(w, trim=0.5)
    with pytest.raises(ValueError, match="need bins >= 2"):
        fit_weibull_histogram(w, bins=1)
    with pytest.raises(ValueError, match="increasing log10_range"):
        fit_weibull_histogram(w, log10_range=(-3.0, -3.0))
    # bins = 2 passes the check (the bound is inclusive), but two bins never give the three points a fit needs.
    with pytest.raises(ValueError, match="histogram bins fall in the kept band"):
        fit_weibull_histogram(w, bins=2)


def test_large_matrix_fit_streams_in_chunks():
    # Memory contract: a matrix larger than one chunk is fitted piecewise; the result equals the one-piece sort.
    w = torch.randn(3000, 400, generator=torch.Generator().manual_seed(2)) * 0.02
    assert fit_weibull(w, chunk=250_000).k == pytest.approx(fit_weibull(w).k, rel=1e-12)


def test_int_and_bf16_inputs():
    with pytest.raises(ValueError, match="floating-point"):
        fit_weibull(torch.arange(10))
    w = (0.02 * torch.randn(100_000, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    ref = numpy_fit(w.float().numpy(), 0.1)
    assert fit_weibull(w).k == pytest.approx(ref[0], rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fit", ["fit_weibull", "fit_weibull_histogram"])
def test_nonfinite_weights_are_refused_not_fitted(bad, fit):
    """A NaN counted as nonzero but dropped by ``a > 0`` once made N and the sample disagree: a finite, wrong k."""
    import instrumented_adamw.weibull.fit as W

    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    w[:10] = 0.0
    w[500] = bad
    with pytest.raises(ValueError, match=f"{fit} needs finite weights"):
        getattr(W, fit)(w, trim=0.0)
