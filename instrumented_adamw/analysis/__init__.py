"""Analyses of run directories: reading them (``runs``), closed loop, spline recovery and depth (``analyze``),
figures and the HTML report (``report``, ``plotting``), the papers' published numbers (``paper_numbers``)."""
