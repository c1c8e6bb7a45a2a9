"""Weibull fits of |W| (``fit``: the papers' probability-plot protocol and its histogram variant, the half-normal
anchor) and the per-block diagnostics F1–F8 of the framework paper (``diagnostics``)."""

from instrumented_adamw.weibull.fit import WeibullFit, fit_weibull, fit_weibull_histogram, half_normal_anchor

__all__ = ["WeibullFit", "fit_weibull", "fit_weibull_histogram", "half_normal_anchor"]
