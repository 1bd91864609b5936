"""How every figure looks and is written: colours, labels, grouped bars, sweep lines, the caption, the file.

Layer: figures (imports emulator.figures.data and emulator.results.record, plus matplotlib: Figure objects
drawn by the Agg canvas, never pyplot's global state). Our models are scaled down (each experiment's
`description` says how, and goes into the caption), so the paper's numbers and ours sit in separate panels
or on separate axes with the same layout: compare shapes and ratios, not values. A figure is written to a
temp file in its folder, then renamed. Must not read results files.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, ScalarFormatter

from emulator.figures.data import OOM_EXTRAPOLATED, OOM_STOPPED, Point, description
from emulator.results.record import ResultRecord

MiB, GiB = 2**20, 2**30
CATEGORY_COLORS = {"compute": "#4C72B0", "comm": "#DD8452", "load": "#55A868", "stall": "#C44E52"}
OTHER_COLOR = "#999999"
# baseline modes of emulator/run/baselines.py and the columns of the paper's Table 3 they stand for
MODES = ("standalone", "offload", "standalone+ms", "pipeline", "galaxy", "tpi")
MODE_LABELS = {"standalone": "Standalone (Transformers)", "offload": "Offload (Accelerate)",
               "standalone+ms": "Standalone + MS", "pipeline": "Pipeline (MP)", "galaxy": "Galaxy",
               "tpi": "TPI-LLM"}
PAPER_TABLE3 = {"transformers": "standalone", "accelerate": "offload", "transformers_ms": "standalone+ms",
                "tpi_llm": "tpi"}
MODE_COLORS = {"standalone": "C0", "offload": "C1", "standalone+ms": "C2", "tpi": "C3", "pipeline": "C5",
               "galaxy": "C6"}

Series = tuple[str, str, list[float | None], list[str | bool]]  # label, colour, values, marks
Lines = dict[str, list[tuple[float, float | None, Point]]]  # series label -> [(x, y, point)] by x


def new_figure(nrows: int, ncols: int, width: float, height: float):
    """A figure of nrows x ncols panels (axes[row][col]), width x height inches, on an Agg canvas."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def finish(fig, out: Path, title: str, records: Sequence[ResultRecord], notes: str, w_pad: float = 1.0) -> None:
    """Title on top; below the panels a caption with the experiment's scaling description and `notes`
    (what is ours, what is the paper's); then write `out` atomically."""
    width_in = fig.get_size_inches()[0]
    chars = max(60, int(width_in * 15))
    desc = description(records)
    parts = ([f"Setting: {desc}"] if desc else []) + [notes]
    caption = "\n".join(textwrap.fill(p, chars) for p in parts if p)
    height_in = fig.get_size_inches()[1]
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height_in), w_pad=w_pad)
    # the caption goes below everything drawn (rotated tick labels included); the saved image grows to it
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    fig.text(0.01, (drawn.y0 - 0.15) / height_in, caption, fontsize=8, va="top", ha="left")
    save(fig, out)


def save(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def mem_unit(values: Iterable[float | None]) -> tuple[str, float]:
    vals = [v for v in values if v]
    return ("GiB", GiB) if vals and max(vals) >= 2 * GiB else ("MiB", MiB)


# An OOM is drawn as what it is: a device really stopped at its cap, or a run that completed and whose memory
# only extrapolates over the cap (measured RSS + the repeated layers of a unique-layer model). Never mixed:
# each has its own hatch (bars) or marker (lines) and legend entry.
OOM_HATCH = {OOM_STOPPED: "///", OOM_EXTRAPOLATED: "..."}
OOM_MARKER = {OOM_STOPPED: dict(marker="X", ms=9, color="black"),
              OOM_EXTRAPOLATED: dict(marker="o", ms=11, mfc="none", color="black")}
OOM_KEY = {OOM_STOPPED: "OOM: a device was stopped at its cap (watchdog or cgroup)",
           OOM_EXTRAPOLATED: "OOM (extrap.): ran to the end; measured RSS + the model's repeated layers > cap"}


def oom_key(ax, kind: str, bar: bool) -> None:
    """Add the legend entry of an OOM kind to `ax` once (a hatched patch for bars, a marker for lines)."""
    if kind not in OOM_KEY or OOM_KEY[kind] in ax.get_legend_handles_labels()[1]:
        return
    if bar:
        ax.bar([0], [0], 0, color="white", edgecolor="black", hatch=OOM_HATCH[kind], label=OOM_KEY[kind])
    else:
        ax.plot([], [], ls="none", label=OOM_KEY[kind], **OOM_MARKER[kind])


def mark_oom(ax, x: float, y: float | None, p: Point, color: str) -> None:
    """Mark an OOM point of a line at (x, y): a filled X for a real stop, a hollow ring for an extrapolated
    one, each labelled and keyed in the legend; y None (no value to draw): the label at the axis foot."""
    kind = p.oom_kind
    if not kind:
        return
    if y is None:
        ax.annotate(kind, (x, 0), xycoords=("data", "axes fraction"), fontsize=7, color=color, rotation=90,
                    va="bottom")
    else:
        ax.plot([x], [y], ls="none", zorder=5, **OOM_MARKER[kind])
        ax.annotate(kind, (x, y), fontsize=7, color=color, xytext=(4, 4), textcoords="offset points")
    oom_key(ax, kind, bar=False)


def bars(ax, groups: list[str], series: list[Series], ylabel: str, title: str = "") -> None:
    """Grouped bars: x = groups; each series (label, color, values, marks). A marked bar ("OOM",
    "OOM (extrap.)", "skipped", "error"; True = "OOM") is hatched and labelled: drawn at its value when
    there is one (the paper prints memory for OOM rows), else at a stub height. Our two OOM kinds have
    their own hatch (/// stopped, ... extrapolated) and legend entry."""
    finite = [v for _, _, vals, _ in series for v in vals if v is not None]
    stub = (max(finite) if finite else 1.0) * 0.12
    k = max(1, len(series))
    width = 0.8 / k
    for i, (label, color, vals, failed) in enumerate(series):
        xs = [g + (i - (k - 1) / 2) * width for g in range(len(groups))]
        heights = [(v if v is not None else (stub if f else 0.0)) for v, f in zip(vals, failed)]
        drawn = ax.bar(xs, heights, width, color=color, label=label, edgecolor="black", linewidth=0.3)
        for rect, v, f in zip(drawn, vals, failed):
            if f:  # hatched: white with a coloured hatch at a stub height, or pale with a black hatch
                rect.set_hatch(OOM_HATCH.get(f, "///") if isinstance(f, str) else "///")
                if isinstance(f, str):
                    oom_key(ax, f, bar=True)
                rect.set_facecolor("white" if v is None else (*rect.get_facecolor()[:3], 0.35))
                rect.set_edgecolor(color if v is None else "black")
                ax.annotate(f if isinstance(f, str) else "OOM",
                            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                            ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if finite:
        ax.set_ylim(0, max(finite) * 1.35)  # headroom for the legend and the OOM labels


def log_y(ax) -> None:
    """Log y axis with plain numbers (0.5, 2, 30) and headroom for the legend."""
    heights = [r.get_height() for r in ax.patches if r.get_height() > 0]
    ax.set_yscale("log")
    if heights:
        ax.set_ylim(min(heights) / 2, max(heights) * 6)
    for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        fmt = ScalarFormatter()
        fmt.set_scientific(False)
        axis_fmt(fmt)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))


def integer_x(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def ordered_models(tables: dict, ours: Iterable[str]) -> list[str]:
    """The paper's model order, then any other model of ours."""
    paper = list((tables.get("models") or {}).keys())
    ours = list(dict.fromkeys(ours))
    return [m for m in paper if m in ours] + [m for m in ours if m not in paper]


def _short(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if parts[-1] == "count" and len(parts) > 1 else parts[-1]


def _value(v: Any) -> str:
    """A point value for a legend: a model section by its preset (+ unique layers), others compact."""
    if isinstance(v, dict):
        if v.get("synth"):
            return str(v["synth"]) + (f" ({v['unique_layers']} unique layers)" if v.get("unique_layers") else "")
        return ", ".join(f"{_short(str(k))}={_value(x)}" for k, x in sorted(v.items()))
    return str(v)


def series_label(point: dict, exclude: set[str]) -> str:
    rest = [_value(v) if _short(k) in ("paper_model", "model", "synth") else f"{_short(k)}={_value(v)}"
            for k, v in sorted(point.items()) if k not in exclude]
    return ", ".join(rest) or "ours"


def sweep_lines(points: list[Point], x_of: Callable[..., float | None], x_keys: tuple[str, ...],
                y_of: Callable[[Point], float | None]) -> Lines:
    """{series label: [(x, y, point)] sorted by x}; the series are the other point keys' values."""
    lines: Lines = {}
    for p in points:
        x = x_of(p.rec)
        if x is None:
            continue
        exclude = {k for k in p.point if any(k == n or k.endswith("." + n) for n in x_keys)}
        lines.setdefault(series_label(p.point, exclude), []).append((x, y_of(p), p))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in sorted(lines.items())}


def plot_lines(ax, lines: Lines, scale: float = 1.0, style: str = "-o", mark_failed: bool = True) -> None:
    for i, (label, pts) in enumerate(lines.items()):
        color = f"C{i % 10}"
        xs = [x for x, y, _ in pts if y is not None]
        ys = [y / scale for _, y, _ in pts if y is not None]
        ax.plot(xs, ys, style, color=color, label=f"ours: {label}" if label != "ours" else "ours", ms=4)
        for x, y, p in pts:
            if p.failed and mark_failed:
                ax.axvline(x, color=color, ls=":", lw=0.8)
                ax.annotate(p.status, (x, 0), xycoords=("data", "axes fraction"),
                            fontsize=7, color=color, rotation=90, va="bottom")
                if p.oom:
                    oom_key(ax, p.oom_kind, bar=False)
            elif p.oom and y is not None:  # some run was stopped, or it ran and its memory extrapolates over the cap
                mark_oom(ax, x, y / scale, p, color)
