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
    k0, l0 = half_normal_anchor(0.1)
    assert k0 == pytest.approx(1.20543, abs=1e-5) and l0 == pytest.approx(0.88749, abs=1e-5)
    k90, l90 = half_normal_anchor(0.05)
    assert k90 == pytest.approx(1.19092, abs=1e-5) and l90 == pytest.approx(0.88089, abs=1e-5)
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
def test_histogram_variant_within_1e3_of_exact_on_half_normal(sigma):
    w = sigma * torch.randn(1_000_000, generator=torch.Generator().manual_seed(7))
    exact = fit_weibull(w)
    hist = fit_weibull_histogram(w)
    assert hist.k == pytest.approx(exact.k, abs=1e-3)
    assert hist.lam == pytest.approx(exact.lam, rel=1e-3)
    assert hist.n == pytest.approx(exact.n, abs=1)  # the kept band represents the same 80% of the elements


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


def test_histogram_midpoint_matches_numpy_reading():
    w = np.random.default_rng(5).standard_normal(300_000) * 0.03
    k, lam = numpy_histogram_fit(w, 0.1)
    fit = fit_weibull_histogram(torch.from_numpy(w), edge="midpoint")
    assert fit.k == pytest.approx(k, rel=1e-9) and fit.lam == pytest.approx(lam, rel=1e-9)


def test_histogram_out_of_range_is_not_silently_dropped():
    w = torch.full((1000,), 1e3)  # every |w| above 1e2
    with pytest.raises(ValueError, match="above 1e2"):
        fit_weibull_histogram(w)
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
