"""The words and the text sizes of the report's figures: what a column is called in a title and
on an axis, font sizes that stay legible on a phone, and point labels placed so they neither
overlap nor leave the axes.

Sizes: the report's figures are 6 in wide at 100 dpi (600 px). On a 400 px phone screen an
image is shown about 370 px wide, so a font of ``TICK`` (10 pt, 14 px in the PNG) is still above
8 px on the screen, and ``SMALL`` (the smallest text in any figure, 9 pt) near 8 px.

matplotlib only (no pyplot state); no torch import.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

FIG_SIZE = (6.0, 3.8)  # inches, at DPI: 600 x 380 px
DPI = 100
TITLE = 12
LABEL = 11
TICK = 10
LEGEND = 10
SMALL = 9  # point labels, crowded legends

# column -> (what it is, in words; its unit on an axis). Byte columns are drawn in GiB.
QUANTITIES: dict[str, tuple[str, str]] = {
    "train_seconds": ("training time", "s"),
    "eval_seconds": ("evaluation time", "s"),
    "load_seconds": ("loading time", "s"),
    "trainable_params": ("trainable parameters", ""),
    "trainable_percent": ("trainable parameters", "% of the model"),
    "adapter_bytes": ("adapter size", "GiB"),
    "peak_gpu_allocated_bytes": ("peak GPU memory", "GiB"),
    "peak_gpu_reserved_bytes": ("peak GPU memory reserved", "GiB"),
    "peak_cpu_rss_bytes": ("peak CPU memory", "GiB"),
    "estimated_peak_bytes": ("estimated peak memory", "GiB"),
    "tokens_per_second": ("throughput", "tokens/s"),
    "train_loss": ("training loss", ""),
    "effective_rank": ("effective rank", ""),
}
# words inside a column name that are written otherwise
_WORDS = {"f1": "F1", "gpu": "GPU", "cpu": "CPU", "rss": "RSS", "nll": "NLL", "lr": "learning rate"}


def quantity(column: str) -> str:
    """A column in words, for a title: ``train_seconds`` -> "training time", ``test_accuracy``
    -> "test accuracy", ``eval_f1`` -> "eval F1"."""
    if column in QUANTITIES:
        return QUANTITIES[column][0]
    return " ".join(_WORDS.get(w.lower(), w) for w in str(column).split("_") if w)


def axis_label(column: str) -> str:
    """A column in words with its unit, for an axis: ``train_seconds`` -> "training time (s)",
    ``peak_cpu_rss_bytes`` -> "peak CPU memory (GiB)", ``test_accuracy`` -> "test accuracy"."""
    unit = QUANTITIES.get(column, ("", ""))[1]
    return f"{quantity(column)} ({unit})" if unit else quantity(column)


def new_figure(title: str, size: tuple[float, float] = FIG_SIZE) -> tuple[Figure, Axes]:
    """A figure with one axes (Agg canvas, constrained layout), its title at ``TITLE`` and its
    ticks at ``TICK`` points."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=TITLE, loc="left")
    ax.tick_params(labelsize=TICK)
    return fig, ax


# ----------------------------------------------------------------------------- point labels

# where a label may go around its point, in pixels: right, left, above, below, the diagonals,
# then the same further out (joined to the point by a thin line)
_SPOTS = [
    (dx * r, dy * r)
    for r in (8, 18, 32, 50)
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))
]


def place_labels(
    ax: Axes,
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str],
    fontsize: float = SMALL,
) -> list[Annotation]:
    """Label each point (data coordinates) at the first spot around it where the label overlaps
    no other label, no point and no legend, and stays inside the axes (``_SPOTS``); when no spot
    is free, at the one that overlaps least. Call it last, after the limits, the axis labels and
    the legend are set: it lays the figure out once to know where the points are drawn."""
    fig = ax.get_figure()
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer).shrunk(0.98, 0.98)
    pts = ax.transData.transform(list(zip(xs, ys)))
    taken = [Bbox.from_extents(x - 6, y - 6, x + 6, y + 6) for x, y in pts]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    out = []
    for (x, y), xd, yd, text in zip(pts, xs, ys, labels):
        w, h = _text_size(ax, text, fontsize, renderer)
        best, best_cost = None, float("inf")
        for dx, dy in _SPOTS:
            box = _box(x + dx, y + dy, w, h, dx, dy)
            cost = sum(_overlap(box, t) for t in taken) + 4 * _outside(box, frame)
            if cost < best_cost:
                best, best_cost = (dx, dy, box), cost
            if cost == 0:
                break
        dx, dy, box = best
        taken.append(box)
        far = abs(dx) > 8 or abs(dy) > 8
        out.append(
            ax.annotate(
                text,
                (xd, yd),
                xytext=(dx * 72 / fig.dpi, dy * 72 / fig.dpi),
                textcoords="offset points",
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                fontsize=fontsize,
                color="#374151",
                arrowprops={"arrowstyle": "-", "color": "#9ca3af", "lw": 0.6} if far else None,
            )
        )
    return out


def _text_size(ax: Axes, text: str, fontsize: float, renderer: object) -> tuple[float, float]:
    t = ax.text(0, 0, text, fontsize=fontsize)
    ext = t.get_window_extent(renderer)
    t.remove()
    return ext.width, ext.height


def _box(x: float, y: float, w: float, h: float, dx: float, dy: float) -> Bbox:
    """The label's box when its anchor (ha/va from the offset's signs) is at (x, y)."""
    x0 = x if dx > 0 else x - w if dx < 0 else x - w / 2
    y0 = y if dy > 0 else y - h if dy < 0 else y - h / 2
    return Bbox.from_bounds(x0, y0, w, h)


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    """The area of ``box`` outside ``frame``."""
    return box.width * box.height - _overlap(box, frame)
