"""Figure plumbing shared by the report and the analyses: a headless backend, readable defaults, distinct colours."""

from __future__ import annotations

from pathlib import Path

from instrumented_adamw.utils.extras import require

#: Legend and tick sizes that stay readable when a figure is shown at half width in the HTML report.
LEGEND_SIZE = 8
#: Line colours that stay distinct on white: tab10 then tab20's darker half, no pale yellows.
_PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
    "#393b79", "#843c39", "#637939", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#8c6d31",
)  # fmt: skip


def plt():
    """``matplotlib.pyplot`` on the Agg backend (figures are files; no display is needed or used)."""
    matplotlib = require("matplotlib", "drawing figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    pyplot.rcParams.update({"legend.fontsize": LEGEND_SIZE, "axes.titlesize": 10, "axes.labelsize": 9})
    return pyplot


def colors(n: int) -> list[str]:
    """``n`` colours, distinct for up to 20 lines and never pale (cycled beyond that)."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(n)]


def save_figure(fig, path: Path) -> None:
    """Tight layout, PNG at 110 dpi, and close (figures are made in loops over runs: free them)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)


def compact_png(path: Path) -> int:
    """Rewrite a figure as a 256-colour palette PNG (line plots look the same; committed figures take about a third
    of the bytes); returns the new size."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as im:
        image = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    return path.stat().st_size
