"""Weibull probability-plot fits: anchors by quadrature, recovery, and parity with an independent numpy fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instrumented_adamw.weibull import fit_weibull, fit_weibull_histogram, half_normal_anchor, hazen_rank_range


def numpy_fit(w: np.ndarray, trim: float) -> tuple[float, float, float]:
    """Independent float64 reference: full sort, vectorised Hazen mask, np.polyfit."""
    a = np.sort(np.abs(w.astype(np.float64)))
    a = a[a > 0]
    n = a.size
    f = (np.arange(1, n + 1, dtype=np.float64) - 0.5) / n
    keep = (f >= trim) & (f <= 1 - trim)
    x, y = np.log(a[keep]), np.log(-np.log1p(-f[keep]))
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
