"""Markdown cells and tables for the generated documents (``docs/results.md``): one number format everywhere."""

from __future__ import annotations

import math


def fmt_f(v: float | None, digits: int = 1) -> str:
    """Fixed-point, or an en dash for a missing or non-finite value."""
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_shares(values, digits: int = 1) -> str:
    """A force budget's shares as ``align / inject / decay`` (percent), or an en dash where there is none."""
    return "–" if values is None else " / ".join(fmt_f(v, digits) for v in values)


def fmt_g(v: float | None, digits: int = 4) -> str:
    """Significant digits, or an en dash for a missing or non-finite value."""
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def met(ok: bool | None) -> str:
    """A target's verdict: "met", "**missed**", or an en dash where it could not be measured."""
    return "–" if ok is None else ("met" if ok else "**missed**")
