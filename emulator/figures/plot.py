"""Figures of the paper's experiments, from results/*.jsonl only: `python -m emulator plot --all`.

    results/<experiment>.jsonl       one line per run (emulator/report.py; Fig. 3: emulator/allreduce_sweep.py)
      | load; per point, keep only the lines of the latest sweep that measured it (a rerun replaces)
      | aggregate the runs of one point: median TTFT / token latency over completed runs, the max peak
      |   memory over devices and runs, OOM when any run ran (or would have run) out of memory
      + configs/paper_tables.yaml      the paper's tables as data
      v
    results/figures/<experiment>.png  (written to a temp file, then renamed)

One function per figure, registered in FIGURES under its experiment's name. Our models are scaled down
(each experiment's `description` says how, and goes into the caption), so the paper's numbers and ours
sit in separate panels or on separate axes with the same layout: compare shapes and ratios, not values.

What each figure reads from a results line (besides `experiment`, `error`, `oom`, and `config.description`
or `description` for the caption; a point's coordinates come from the resolved `config`, with `point`
as fallback and for grouping):

    figure            point keys / config                             measurements
    fig1_timeline     mode (tpi | pipeline)                           trace {device: [[name, category,
                                                                      start_s, duration_s], ...]}, time_split
    fig1_memory       devices, options.window, model.config           peak_mem_bytes
    fig3_allreduce    point {algo, tau_ms, clock, devices}            latency_median_s, latency_p99_s, model_s,
                                                                      paper_model_s (allreduce_sweep.py)
    table1            paper model, options.window (null = off)        ttft_s, token_latency_s, peak_mem_bytes
    table2_6_memory   paper model, devices, options.window            peak_mem_bytes
    fig5_scaling      one of devices / cores|speed / bandwidth        token_latency_s
                      per point (or point.panel)
    fig6_baselines    paper model, options.mode                       ttft_s, token_latency_s
    table3_laptops    paper model, options.mode, devices or testbed   ttft_s, token_latency_s
    window_sweep      options.window                                  token_latency_s, peak_mem_bytes
    link_latency_sweep links latency, options.allreduce, model.config token_latency_s
    device_scaling    devices                                         token_latency_s, peak_mem_bytes
    stall_prediction  paper model, the rest of the point as setting   window[*].steps[*].stall_s (else
                                                                      time_split stall_s / tokens),
                                                                      prediction.stall_per_token_s (else
                                                                      window[*].steady.measured, replayed)

The paper model of a line: point.paper_model, then the line's paper_model, point.model / model.synth,
config.model.synth, the model folder's name. Mode: point options.mode, the line's mode, config.options.mode
(default tpi). Memory: peak_mem_bytes (else peak_rss_bytes), max over devices; OOM: `oom` or `mem_over_cap`
non-empty. Devices: config.devices_run (one-device modes), else the topology's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from emulator.config.run_config import ROOT

DEFAULT_RESULTS = ROOT / "results"
DEFAULT_TABLES = ROOT / "configs" / "paper_tables.yaml"
MiB, GiB = 2**20, 2**30
CATEGORY_COLORS = {"compute": "#4C72B0", "comm": "#DD8452", "load": "#55A868", "stall": "#C44E52"}
OTHER_COLOR = "#999999"
# baseline modes of emulator/baselines.py and the columns of the paper's Table 3 they stand for
MODES = ("standalone", "offload", "standalone+ms", "pipeline", "galaxy", "tpi")
MODE_LABELS = {"standalone": "Standalone (Transformers)", "offload": "Offload (Accelerate)",
               "standalone+ms": "Standalone + MS", "pipeline": "Pipeline (MP)", "galaxy": "Galaxy",
               "tpi": "TPI-LLM"}
PAPER_TABLE3 = {"transformers": "standalone", "accelerate": "offload", "transformers_ms": "standalone+ms",
                "tpi_llm": "tpi"}
MODE_COLORS = {"standalone": "C0", "offload": "C1", "standalone+ms": "C2", "tpi": "C3", "pipeline": "C5",
               "galaxy": "C6"}


class NoData(Exception):
    """The records cannot make this figure; the message says what is missing."""


# ---------------------------------------------------------------------------------------------------
# Reading results


def read_records(path: Path) -> list[dict]:
    """Lines of a results file; a line that is not JSON (a run killed mid-write) is skipped with a note."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: {path}:{i}: not a JSON line, skipped", file=sys.stderr)
    return out


def point_key(rec: dict) -> str:
    return json.dumps(rec.get("point") or {}, sort_keys=True, default=str)


def latest_sweeps(records: list[dict]) -> list[dict]:
    """Per point, only the lines of the last sweep (in file order) that measured it: a rerun of an
    experiment, or of some of its points, replaces the older lines instead of mixing with them. Lines
    without a `sweep` id are all kept."""
    last: dict[str, Any] = {}
    for r in records:
        if r.get("sweep") is not None:
            last[point_key(r)] = r["sweep"]
    return [r for r in records if r.get("sweep") is None or last.get(point_key(r)) == r["sweep"]]


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _point_value(rec: dict, *names: str) -> tuple[str, Any] | None:
    """The (key, value) of the first point key that is one of `names` or ends with '.' + one of them."""
    for k, v in (rec.get("point") or {}).items():
        for name in names:
            if k == name or k.endswith("." + name):
                return k, v
    return None


def _number(v: Any) -> float | None:
    """5, 5.0, '5', '5ms', '300mbps' -> a float (units dropped); None if not a number."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip().lower()
    for unit in ("gbps", "mbps", "ms", "us", "s"):
        if s.endswith(unit):
            try:
                x = float(s[: -len(unit)])
            except ValueError:
                return None
            return x * {"gbps": 1000.0, "mbps": 1.0, "ms": 1.0, "us": 1e-3, "s": 1e3}[unit]
    try:
        return float(s)
    except ValueError:
        return None


def model_name(rec: dict) -> str:
    hit = _point_value(rec, "paper_model")
    if hit:
        return str(hit[1])
    if rec.get("paper_model"):
        return str(rec["paper_model"])
    hit = _point_value(rec, "model", "synth")
    if hit and isinstance(hit[1], str):
        return hit[1]
    synth = _get(rec, "config", "model", "synth")
    if synth:
        return str(synth)
    path = _get(rec, "config", "model", "path") or _get(rec, "config", "model", "folder")
    return os.path.basename(str(path).rstrip("/")) if path else "?"


def mode_of(rec: dict) -> str:
    hit = _point_value(rec, "mode")
    if hit:
        return str(hit[1])
    return str(rec.get("mode") or _get(rec, "config", "options", "mode") or "tpi")


def window_of(rec: dict) -> int | None:
    """The sliding window in blocks, None = no scheduler (all weights resident)."""
    cfg = _get(rec, "config", "options")
    if isinstance(cfg, dict) and "window" in cfg:
        w = cfg["window"]
    else:
        hit = _point_value(rec, "window")
        w = hit[1] if hit else None
    if w is None or (isinstance(w, str) and w.lower() in ("none", "null", "off")):
        return None
    return int(w)


def devices_of(rec: dict) -> int | None:
    run = _get(rec, "config", "devices_run")  # one-device modes run the topology's first device alone
    if isinstance(run, list) and run:
        return len(run)
    devs = _get(rec, "config", "topology", "devices")
    if isinstance(devs, list) and devs:
        return len(devs)
    hit = _point_value(rec, "devices.count", "devices", "world_size")
    return int(hit[1]) if hit and _number(hit[1]) is not None else None


def _links(rec: dict) -> list[dict]:
    links = _get(rec, "config", "topology", "links")
    return list(links.values()) if isinstance(links, dict) else []


def link_latency_ms(rec: dict) -> float | None:
    lat = [link.get("latency_ms") for link in _links(rec) if link.get("latency_ms") is not None]
    if lat:
        return float(min(lat))
    hit = _point_value(rec, "latency_ms", "tau_ms", "latency")
    return _number(hit[1]) if hit else None


def bandwidth_mbps(rec: dict) -> float | None:
    bw = [link.get("bandwidth_mbps") for link in _links(rec)]
    if bw and all(b is not None for b in bw):
        return float(min(bw))
    hit = _point_value(rec, "bandwidth_mbps", "bandwidth")
    return _number(hit[1]) if hit else None


def cores_of(rec: dict) -> float | None:
    """Cores per device, or the device speed when that is what the point varies (virtual clock)."""
    hit = _point_value(rec, "speed")
    devs = _get(rec, "config", "topology", "devices") or []
    if hit:
        return float(devs[0]["speed"]) if devs and "speed" in devs[0] else _number(hit[1])
    if devs and "cores" in devs[0]:
        return float(devs[0]["cores"])
    hit = _point_value(rec, "cores")
    return _number(hit[1]) if hit else None


def description(records: Iterable[dict]) -> str:
    for r in records:
        for d in (r.get("description"), _get(r, "config", "description"),
                  _get(r, "config", "experiment", "description")):
            if d:
                return " ".join(str(d).split())
    return ""


def time_unit(records: Iterable[dict], per: str = "s") -> str:
    """An axis unit for times: `per` ("s", "s/token"), marked virtual when every run used the virtual
    clock (the time N devices of the modelled speed would take, not this host's)."""
    clocks = {_get(r, "config", "clock", "kind") or _get(r, "config", "options", "clock") for r in records}
    return f"{per}, virtual clock" if clocks == {"virtual"} else per


def peak_bytes(rec: dict) -> int | None:
    """The memory to set beside the paper's, max over devices: peak_mem_bytes (peak RSS plus, for a
    unique-layer model with resident weights, the repeated layers a real model would hold), else the
    peak RSS; a device stopped for exceeding its cap counts with the RSS it was stopped at."""
    per_device = rec.get("peak_mem_bytes") or rec.get("peak_rss_bytes") or {}
    peaks = [v for v in per_device.values() if v]
    peaks += [o.get("rss_bytes") or 0 for o in rec.get("oom") or []]
    return max(peaks) if peaks else None


def out_of_memory(rec: dict) -> bool:
    """A device was stopped for exceeding its cap (`oom`), or its extrapolated memory is above the cap
    (`mem_over_cap`: it ran to the end, so its times stand, but a real device would have run out)."""
    return bool(rec.get("oom") or rec.get("mem_over_cap"))


def trace_of(rec: dict) -> dict:
    """{device: [[name, category, start_s, duration_s], ...]} (`trace`; `trace_events` accepted too)."""
    return rec.get("trace") or rec.get("trace_events") or {}


@dataclass
class Point:
    """The runs of one sweep point, aggregated."""

    point: dict
    records: list[dict] = field(default_factory=list)

    @property
    def rec(self) -> dict:
        return self.records[-1]

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.records if not r.get("error") and not r.get("oom")]

    def median(self, key: str) -> float | None:
        xs = [r[key] for r in self.ok if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return statistics.median(xs) if xs else None

    @property
    def ttft_s(self) -> float | None:
        return self.median("ttft_s")

    @property
    def token_latency_s(self) -> float | None:
        return self.median("token_latency_s")

    @property
    def peak_bytes(self) -> int | None:
        peaks = [p for p in (peak_bytes(r) for r in self.records) if p]
        return max(peaks) if peaks else None

    @property
    def oom(self) -> bool:
        return any(out_of_memory(r) for r in self.records)

    @property
    def failed(self) -> bool:
        """No run of the point completed (OOM, an error, or skipped: a point that cannot run)."""
        return not self.ok

    @property
    def status(self) -> str:
        """What a figure marks on the point: "" (ran), "OOM", "skipped" or "error"."""
        if self.oom:
            return "OOM"
        if self.failed:
            return "skipped" if all(r.get("skipped") for r in self.records) else "error"
        return ""


def aggregate(records: list[dict]) -> list[Point]:
    groups: dict[str, Point] = {}
    for r in records:
        groups.setdefault(point_key(r), Point(dict(r.get("point") or {}))).records.append(r)
    return list(groups.values())


def load_tables(path: Path | None = None) -> dict:
    import yaml

    path = path or DEFAULT_TABLES
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        print(f"note: {path}: cannot read the paper's tables ({e.strerror}); plotting ours only", file=sys.stderr)
        return {}


# ---------------------------------------------------------------------------------------------------
# The paper's memory formula (tpicore.planner when importable)


def paper_formula_bytes(dims: dict, n: int, window: int = 2) -> int | None:
    """The paper's peak-memory formula (parameters x 4 bytes), the max over N devices with equal
    shares, for a model of `dims` (HF config keys, as recorded in config.model.config)."""
    from tpicore.errors import TpiError

    dims = {k: v for k, v in (dims or {}).items() if v is not None and k != "torch_dtype"}
    try:
        from tpicore.model.config import ModelConfig
        from tpicore.model.split import plan_layouts
        from tpicore.tools.planner import paper_peak_bytes
    except ImportError:  # the planner is not in this checkout: the formula with equal shares, below
        pass
    else:
        try:
            cfg = ModelConfig.from_dict(dims, source="results: config.model.config")
            return max(paper_peak_bytes(cfg, lay, window) for lay in plan_layouts(cfg, n))
        except TpiError:  # dims missing, or a split that cannot exist (more devices than heads)
            return None
    try:
        h, v, s = dims["hidden_size"], dims["vocab_size"], dims["intermediate_size"]
        a = dims["num_attention_heads"]
        b = dims.get("num_key_value_heads") or a
    except KeyError:
        return None
    p = 1.0 / n

    def worker(w: int) -> float:
        return (w // 2) * (2 * (1 + b / a) * h * h * p + h) + ((w + 1) // 2) * (3 * h * s * p + h)

    return int(4 * max(worker(window), 2 * h * v + h + worker(window - 2)))


# ---------------------------------------------------------------------------------------------------
# Drawing helpers

FIGURES: dict[str, Callable[[list[dict], dict, Path], None]] = {}


def figure(name: str):
    def register(fn):
        FIGURES[name] = fn
        return fn
    return register


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(nrows: int, ncols: int, width: float, height: float):
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    return fig, axes


def finish(fig, out: Path, title: str, records: list[dict], notes: str, w_pad: float = 1.0) -> None:
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
    finally:
        _plt().close(fig)


def mem_unit(values: Iterable[float | None]) -> tuple[str, float]:
    vals = [v for v in values if v]
    return ("GiB", GiB) if vals and max(vals) >= 2 * GiB else ("MiB", MiB)


def bars(ax, groups: list[str], series: list[tuple[str, str, list[float | None], list[str | bool]]],
         ylabel: str, title: str = "") -> None:
    """Grouped bars: x = groups; each series (label, color, values, marks). A marked bar ("OOM",
    "skipped", "error"; True = "OOM") is hatched and labelled: drawn at its value when there is one (the
    paper prints memory for OOM rows), else at a stub height."""
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
                rect.set_hatch("///")
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
    from matplotlib.ticker import LogLocator, ScalarFormatter

    heights = [r.get_height() for r in ax.patches if r.get_height() > 0]
    ax.set_yscale("log")
    if heights:
        ax.set_ylim(min(heights) / 2, max(heights) * 6)
    for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        fmt = ScalarFormatter()
        fmt.set_scientific(False)
        axis_fmt(fmt)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))


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


def integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def sweep_lines(points: list[Point], x_of: Callable[[dict], float | None], x_keys: tuple[str, ...],
                y_of: Callable[[Point], float | None]) -> dict[str, list[tuple[float, float | None, Point]]]:
    """{series label: [(x, y, point)] sorted by x}; the series are the other point keys' values."""
    lines: dict[str, list[tuple[float, float | None, Point]]] = {}
    for p in points:
        x = x_of(p.rec)
        if x is None:
            continue
        exclude = {k for k in p.point if any(k == n or k.endswith("." + n) for n in x_keys)}
        lines.setdefault(series_label(p.point, exclude), []).append((x, y_of(p), p))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in sorted(lines.items())}


def plot_lines(ax, lines, scale: float = 1.0, style: str = "-o", mark_failed: bool = True) -> None:
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
            elif p.oom and y is not None:  # ran, but its memory extrapolates above the device's cap
                ax.annotate("OOM", (x, y / scale), fontsize=7, color=color, xytext=(3, 3), textcoords="offset points")


# ---------------------------------------------------------------------------------------------------
# Figures


@figure("fig1_timeline")
def fig1_timeline(records: list[dict], tables: dict, out: Path) -> None:
    """Gantt of one token per rank, TP (tpi) beside pipeline, and each mode's time shares."""
    by_mode: dict[str, list[dict]] = {}
    for r in records:
        by_mode.setdefault(mode_of(r), []).append(r)
    modes = [m for m in ("tpi", "pipeline") if m in by_mode] + [m for m in by_mode if m not in ("tpi", "pipeline")]
    if not modes:
        raise NoData("no runs")
    clock = " (virtual clock)" if time_unit(records).endswith("virtual clock") else ""
    fig, axes = new_figure(1, len(modes) + 1, 5 * len(modes) + 4, 4.5)
    any_trace = False
    for ax, m in zip(axes[0], modes):
        traced = [r for r in by_mode[m] if trace_of(r)]
        ax.set_title(f"{MODE_LABELS.get(m, m)}: one token", fontsize=10)
        if not traced:
            ax.text(0.5, 0.5, "no trace in these records\n(run with options.trace: true)", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        any_trace = True
        events = trace_of(traced[-1])
        names = list(events)
        t0 = min((e[2] for evs in events.values() for e in evs), default=0.0)
        for row, name in enumerate(names):
            for _, cat, start, dur in events[name]:
                ax.broken_barh([((start - t0) * 1e3, dur * 1e3)], (row - 0.4, 0.8),
                               facecolors=CATEGORY_COLORS.get(cat, OTHER_COLOR))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_xlabel(f"time since the token's first event (ms{clock})")
        ax.grid(axis="x", alpha=0.3)
    _plt()
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in CATEGORY_COLORS.items()]
    ax = axes[0][-1]
    shares = []
    for m in modes:
        tot = {k: 0.0 for k in CATEGORY_COLORS}
        for r in by_mode[m]:
            for split in (r.get("time_split") or {}).values():
                for k in tot:
                    tot[k] += (split or {}).get(f"{k}_s", 0.0) or 0.0
        s = sum(tot.values())
        shares.append({k: v / s for k, v in tot.items()} if s > 0 else None)
    if not any_trace and not any(shares):
        raise NoData("records have neither a trace nor a time_split")
    left = [0.0] * len(modes)
    for k, c in CATEGORY_COLORS.items():
        vals = [(sh or {}).get(k, 0.0) for sh in shares]
        ax.barh(range(len(modes)), vals, left=left, color=c, label=k)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(modes)))
    ax.set_yticklabels([MODE_LABELS.get(m, m) for m in modes])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of device time, all devices (fraction)")
    ax.set_title("ours: compute vs comm share", fontsize=10)
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=4)
    finish(fig, out, "Fig. 1: where a token's time goes, tensor vs pipeline parallel", records,
           "ours: trace of one decoded token per device (compute / allreduce / weight load / stall), and the "
           "time split summed over devices and runs. paper: Fig. 1 shows the same trade-off qualitatively "
           "(communication dominates TP on edge links); it gives no numbers to plot.")


@figure("fig1_memory")
def fig1_memory(records: list[dict], tables: dict, out: Path) -> None:
    """Peak memory per device vs N: TP without the scheduler, the paper's formula, TPI (with it)."""
    points = [p for p in aggregate(records) if devices_of(p.rec)]
    if not points:
        raise NoData("no runs with a device count")
    unit, scale = mem_unit([p.peak_bytes for p in points])
    fig, axes = new_figure(1, 1, 8, 5)
    ax = axes[0][0]
    models = ordered_models(tables, (model_name(p.rec) for p in points))
    markers = "osD^v<>"
    for mi, model in enumerate(models):
        mine = [p for p in points if model_name(p.rec) == model]
        tag = f" ({model})" if len(models) > 1 else ""
        for sched, color, label in ((False, "C0", "ours: TP, no scheduler"), (True, "C3", "ours: TPI-LLM")):
            sel = sorted((devices_of(p.rec), p) for p in mine if (window_of(p.rec) is not None) == sched)
            xs = [n for n, p in sel if p.peak_bytes]
            ys = [p.peak_bytes / scale for n, p in sel if p.peak_bytes]
            if xs:
                windows = sorted({window_of(p.rec) for _, p in sel if window_of(p.rec)})
                wl = f" (w={','.join(map(str, windows))})" if windows else ""
                ax.plot(xs, ys, "-" + markers[mi % 7], color=color, label=label + wl + tag)
            for n, p in sel:
                if p.oom:
                    ax.annotate("OOM", (n, p.peak_bytes / scale if p.peak_bytes else 0), fontsize=7, color=color)
        dims = _get(mine[-1].rec, "config", "model", "config") or {}
        ns = sorted({devices_of(p.rec) for p in mine})
        windows = sorted({window_of(p.rec) for p in mine if window_of(p.rec)}) or [2]
        for w in windows:
            formula = [(n, paper_formula_bytes(dims, n, w)) for n in ns]
            formula = [(n, b) for n, b in formula if b]
            if formula:
                ax.plot([n for n, _ in formula], [b / scale for _, b in formula], "--" + markers[mi % 7],
                        color="0.4", mfc="none", label=f"paper formula, w={w}{tag}")
    ax.set_xlabel("devices N")
    integer_x(ax)
    ax.set_ylabel(f"peak memory per device, max over devices ({unit})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    finish(fig, out, "Fig. 1: peak memory per device vs devices", records,
           "ours: peak RSS (VmHWM) of the largest device, without the sliding-window scheduler (all weights "
           "resident) and with it. paper formula: the paper's peak-memory formula (parameters x 4 bytes, "
           "master 2hv + h) for the model we ran; it leaves out the runtime, KV cache and page cache.")


@figure("fig3_allreduce")
def fig3_allreduce(records: list[dict], tables: dict, out: Path) -> None:
    """Allreduce latency vs per-link latency tau: measured points, the hop model as lines."""
    recs = [r for r in records if _get(r, "point", "algo") is not None and _get(r, "point", "tau_ms") is not None]
    if not recs:
        raise NoData("no lines with point.algo and point.tau_ms (written by emulator/allreduce_sweep.py)")
    n = max(_get(r, "point", "devices") or devices_of(r) or 0 for r in recs)
    recs = [r for r in recs if (_get(r, "point", "devices") or devices_of(r) or 0) == n]
    fig, axes = new_figure(1, 1, 8, 5.5)
    ax = axes[0][0]
    algos = [a for a in ("star", "tree", "ring") if any(r["point"]["algo"] == a for r in recs)]
    for i, algo in enumerate(algos):
        color = f"C{i}"
        mine = [r for r in recs if r["point"]["algo"] == algo]
        model = sorted({(r["point"]["tau_ms"], r.get("paper_model_s") if r.get("paper_model_s") is not None
                         else r.get("model_s")) for r in mine if r.get("model_s") is not None})
        paper = all(r.get("paper_model_s") is not None for r in mine)
        if model:
            k = next((m / (t * 1e-3) for t, m in model if t), None)
            what = f"paper model {k:.0f} tau" if paper and k else (f"hop model {k:.0f} tau" if k else "hop model")
            ax.plot([t for t, _ in model], [m * 1e3 for _, m in model], "-", color=color, alpha=0.6,
                    label=f"{algo}: {what}")
        for clock, marker, fill in (("virtual", "o", color), ("wall", "s", "none")):
            pts = sorted((r["point"]["tau_ms"], r["latency_median_s"], r.get("latency_p99_s"))
                         for r in mine if r["point"].get("clock", "virtual") == clock
                         and r.get("latency_median_s") is not None)
            if not pts:
                continue
            xs, med = [p[0] for p in pts], [p[1] * 1e3 for p in pts]
            hi = [max(0.0, ((p[2] if p[2] is not None else p[1]) - p[1]) * 1e3) for p in pts]
            ax.errorbar(xs, med, yerr=[[0] * len(hi), hi], fmt=marker, color=color, mfc=fill, ms=5, capsize=2,
                        label=f"{algo}: ours, {clock} clock (median, bar to p99)")
        for r in mine:
            if r.get("error"):
                ax.annotate("error", (r["point"]["tau_ms"], 0), color=color, fontsize=7)
    ax.set_xlabel("per-link latency tau (ms)")
    ax.set_ylabel("allreduce latency, 4-byte payload (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    finish(fig, out, f"Fig. 3: allreduce latency vs link latency ({n} devices)", records,
           "paper model: link traversals on the critical path x tau (star 8, tree 16, ring 56 at 8 devices "
           "on Klonet; the hop count of our collectives for other N). ours: the same allreduce over the "
           "emulated links; virtual clock = link model only, wall clock = real waits on this host.")


def _table1_paper(tables: dict) -> dict[str, dict[str, list | None]]:
    return {k: tables.get("table1", {}).get(k, {}) for k in ("scheduler_off", "scheduler_on")}


@figure("table1")
def table1(records: list[dict], tables: dict, out: Path) -> None:
    """TTFT, token latency and peak memory per model, scheduler off / on: the paper's and ours."""
    points = aggregate(records)
    if not points:
        raise NoData("no runs")
    paper = _table1_paper(tables)
    paper_models = ordered_models(tables, list(paper["scheduler_on"]) + list(paper["scheduler_off"]))
    models = ordered_models(tables, (model_name(p.rec) for p in points))
    mu, mscale = mem_unit([p.peak_bytes for p in points])

    def ours(model: str, sched: bool) -> Point | None:
        sel = [p for p in points if model_name(p.rec) == model and (window_of(p.rec) is not None) == sched]
        return sel[-1] if sel else None

    fig, axes = new_figure(3, 2, 13, 10)
    metrics = (("TTFT", 0, lambda p: p.ttft_s, "s"), ("token latency", 1, lambda p: p.token_latency_s, "s/token"),
               ("peak memory", 2, None, "mem"))
    colors = {False: "C0", True: "C3"}
    for row, (name, idx, get, kind) in enumerate(metrics):
        ps = []
        for sched in (False, True):
            vals = [(paper["scheduler_on" if sched else "scheduler_off"].get(m) or [None] * 3) for m in paper_models]
            ps.append((f"paper: scheduler {'on' if sched else 'off'}", colors[sched], [v[idx] for v in vals],
                       [v[0] is None for v in vals]))
        bars(axes[row][0], paper_models, ps, f"{name} ({'GB' if kind == 'mem' else kind})",
             f"paper (Table 1): {name}" if row == 0 else "")
        os_ = []
        for sched in (False, True):
            got = [ours(m, sched) for m in models]
            if kind == "mem":
                vals = [p.peak_bytes / mscale if p and p.peak_bytes else None for p in got]
            else:
                vals = [get(p) if p else None for p in got]
            os_.append((f"ours: scheduler {'on' if sched else 'off'}", colors[sched], vals,
                        [p.status if p else "" for p in got]))
        ylabel = f"{name} ({mu})" if kind == "mem" else f"{name} ({time_unit(records, kind)})"
        bars(axes[row][1], models, os_, ylabel, f"ours: {name}" if row == 0 else "")
    axes[0][0].legend(fontsize=8)
    axes[0][1].legend(fontsize=8)
    finish(fig, out, "Table 1: TTFT, token latency and peak memory, scheduler off / on", records,
           "Hatched = OOM, or a point that could not run (skipped). The paper prints the memory an OOM run "
           "would need; ours draws the times of a run whose memory only extrapolates above its cap. ours: median "
           "over runs; peak memory = max over devices of peak RSS (+ the repeated layers a unique-layer model "
           "leaves out). Our models are scaled down, so compare bars within a panel, not across the two columns.")


@figure("table2_6_memory")
def table2_6_memory(records: list[dict], tables: dict, out: Path) -> None:
    """Peak memory vs N per model at w = 2 and 4 (and without the scheduler): paper solid, ours dashed."""
    points = [p for p in aggregate(records) if devices_of(p.rec)]
    if not points:
        raise NoData("no runs with a device count")
    pm = tables.get("peak_memory") or {}
    pn = pm.get("devices") or []
    paper_series = {("window2", "scheduler_off"): (None, "0.5"), ("window2", "scheduler_on"): (2, "C0"),
                    ("window4", "scheduler_on"): (4, "C3")}
    models = ordered_models(tables, (model_name(p.rec) for p in points))
    mu, mscale = mem_unit([p.peak_bytes for p in points])
    cols = min(4, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = new_figure(rows, cols, 4.2 * cols, 3.6 * rows + 0.8)
    for i, model in enumerate(models):
        ax = axes[i // cols][i % cols]
        ax.set_title(model, fontsize=10)
        for (wk, sk), (w, color) in paper_series.items():
            vals = _get(pm, wk, sk, model)
            if vals:
                ax.plot(pn, vals, "-", color=color, label=f"paper: {'w=' + str(w) if w else 'no scheduler'}")
        ax.set_xlabel("devices N")
        integer_x(ax)
        ax.set_ylabel("paper: peak memory (GB)")
        twin = ax.twinx()
        mine = [p for p in points if model_name(p.rec) == model]
        for w in sorted({window_of(p.rec) for p in mine}, key=lambda w: -1 if w is None else w):
            sel = sorted((devices_of(p.rec), p) for p in mine if window_of(p.rec) == w)
            color = {None: "0.5", 2: "C0", 4: "C3"}.get(w, f"C{(w or 0) % 10}")
            xs = [n for n, p in sel if p.peak_bytes]
            ys = [p.peak_bytes / mscale for _, p in sel if p.peak_bytes]
            twin.plot(xs, ys, "--o", color=color, ms=4, label=f"ours: {'w=' + str(w) if w else 'no scheduler'}")
            for n, p in sel:
                if p.oom:
                    twin.annotate("OOM", (n, p.peak_bytes / mscale if p.peak_bytes else 0), fontsize=7, color=color)
        twin.set_ylabel(f"ours: peak memory ({mu})")
        if i == 0:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = twin.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7)
        ax.grid(alpha=0.3)
    for j in range(len(models), rows * cols):
        axes[j // cols][j % cols].set_axis_off()
    finish(fig, out, "Tables 2 and 6: peak memory per device vs devices, window 2 and 4", records,
           "paper (solid, left axis, GB): Tables 2 (w=2) and 6 (w=4). ours (dashed, right axis): max peak RSS "
           "over devices. The paper's claim to check: with the scheduler, memory is almost flat in N.", w_pad=3.0)


def _fig5_panel(rec: dict) -> str | None:
    panel = _get(rec, "point", "panel")
    if panel:
        return str(panel)
    if _point_value(rec, "devices.count", "world_size"):
        return "devices"
    if _point_value(rec, "cores", "speed"):
        return "cores"
    if _point_value(rec, "bandwidth_mbps", "bandwidth"):
        return "bandwidth"
    return None


@figure("fig5_scaling")
def fig5_scaling(records: list[dict], tables: dict, out: Path) -> None:
    """Token latency vs devices, cores and bandwidth (three panels)."""
    points = aggregate(records)
    panels = (("devices", devices_of, ("devices.count", "world_size", "devices"), "devices N"),
              ("cores", cores_of, ("cores", "speed"), "cores per device (speed in virtual mode)"),
              ("bandwidth", bandwidth_mbps, ("bandwidth_mbps", "bandwidth"), "link bandwidth (Mbit/s)"))
    if not any(_fig5_panel(p.rec) for p in points):
        raise NoData("no point varies devices.count, cores/speed or bandwidth (or names a panel)")
    fig, axes = new_figure(1, 3, 15, 4.8)
    for ax, (panel, x_of, keys, xlabel) in zip(axes[0], panels):
        mine = [p for p in points if _fig5_panel(p.rec) == panel]
        ax.set_title(f"vs {panel}", fontsize=10)
        if not mine:
            ax.text(0.5, 0.5, "no runs for this panel", ha="center", va="center", transform=ax.transAxes)
            continue
        lines = sweep_lines(mine, x_of, keys + ("panel",), lambda p: p.token_latency_s)
        plot_lines(ax, lines)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"token latency ({time_unit(records, 's/token')})")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    finish(fig, out, "Fig. 5: token latency vs devices, cores and bandwidth", records,
           "ours: median token latency per point. paper (Llama 2-70B, Fig. 5; values not tabulated): more "
           "devices and more cores cut token latency strongly; 300 Mbit/s -> 1 Gbit/s barely matters.")


@figure("fig6_baselines")
def fig6_baselines(records: list[dict], tables: dict, out: Path) -> None:
    """TTFT and token latency per model for each baseline mode; OOM hatched."""
    points = aggregate(records)
    if not points:
        raise NoData("no runs")
    models = ordered_models(tables, (model_name(p.rec) for p in points))
    modes = [m for m in MODES if any(mode_of(p.rec) == m for p in points)]
    modes += sorted({mode_of(p.rec) for p in points} - set(modes))
    fig, axes = new_figure(1, 3, 17, 5)
    for ax, (name, get) in zip(axes[0], (("TTFT", lambda p: p.ttft_s), ("token latency", lambda p: p.token_latency_s))):
        series = []
        for i, mode in enumerate(modes):
            got = [next((p for p in reversed(points) if model_name(p.rec) == m and mode_of(p.rec) == mode), None)
                   for m in models]
            series.append((f"ours: {MODE_LABELS.get(mode, mode)}", MODE_COLORS.get(mode, f"C{7 + i % 3}"),
                           [get(p) if p else None for p in got], [p.status if p else "" for p in got]))
        per = "s/token" if name == "token latency" else "s"
        bars(ax, models, series, f"{name} ({time_unit(records, per)})", f"ours: {name}")
    axes[0][0].legend(fontsize=7)
    on = _table1_paper(tables)["scheduler_on"]
    pmodels = ordered_models(tables, on)
    vals = [on.get(m) or [None, None, None] for m in pmodels]
    bars(axes[0][2], pmodels, [("paper: TPI-LLM TTFT (s)", "C3", [v[0] for v in vals], [v[0] is None for v in vals]),
                               ("paper: TPI-LLM token latency (s/token)", "C1", [v[1] for v in vals],
                                [v[1] is None for v in vals])],
         "paper: s, s/token", "paper: TPI-LLM (Table 1)")
    axes[0][2].legend(fontsize=7)
    finish(fig, out, "Fig. 6: TPI-LLM vs baselines (8 devices)", records,
           "ours: median over runs; hatched = OOM, skipped (cannot run) or error. paper: Fig. 6's bars are "
           "not tabulated; its TPI-LLM values are Table 1's (right). Its claims: TPI-LLM beats Standalone, "
           "MP (pipeline) and Galaxy; Galaxy's ring is slower than MP.")


def _laptops(rec: dict) -> int | None:
    hit = _point_value(rec, "testbed")
    if hit:
        digits = "".join(c for c in str(hit[1]) if c.isdigit())
        if digits:
            return int(digits)
    return devices_of(rec)


@figure("table3_laptops")
def table3_laptops(records: list[dict], tables: dict, out: Path) -> None:
    """TTFT and token latency per model for the baselines and TPI-LLM on 4 (Table 3) and 3 (Table 8)
    laptops: the paper's and ours."""
    points = aggregate(records)
    if not points:
        raise NoData("no runs")
    t3, t8 = tables.get("table3") or {}, tables.get("table8") or {}
    pmodels = ordered_models(tables, [m for col in t3.values() for m in col])

    def key(p: Point) -> str:
        mode = mode_of(p.rec)
        if mode in ("standalone", "offload", "standalone+ms"):  # one device: the laptop count does not apply
            return mode
        return f"{mode}@{_laptops(p.rec)}"

    keys = sorted({key(p) for p in points}, key=lambda k: (MODES.index(k.split("@")[0]) if k.split("@")[0] in MODES
                                                           else 99, -int(k.split("@")[1]) if "@" in k and
                                                           k.split("@")[1].isdigit() else 0))
    models = ordered_models(tables, (model_name(p.rec) for p in points))
    fig, axes = new_figure(2, 2, 14, 8.5)
    for row, (name, idx, per) in enumerate((("TTFT", 0, "s"), ("token latency", 1, "s/token"))):
        ps = []
        for col, mode in PAPER_TABLE3.items():
            vals = [(t3.get(col) or {}).get(m) for m in pmodels]
            ps.append((f"paper: {MODE_LABELS[mode]}" + (" (4 laptops)" if mode == "tpi" else ""), MODE_COLORS[mode],
                       [v[idx] if v else None for v in vals], [v is None for v in vals]))
        vals8 = [(t8.get("tpi_llm") or {}).get(m) for m in pmodels]
        if any(vals8):
            ps.append(("paper: TPI-LLM (3 laptops, Table 8)", "C4", [v[idx] if v else None for v in vals8],
                       [v is None for v in vals8]))
        bars(axes[row][0], pmodels, ps, f"{name} ({per})", f"paper (Tables 3, 8): {name}")
        log_y(axes[row][0])
        os_ = []
        for i, k in enumerate(keys):
            mode, _, n = k.partition("@")
            got = [next((p for p in reversed(points) if model_name(p.rec) == m and key(p) == k), None) for m in models]
            color = "C4" if mode == "tpi" and n and n != "4" else MODE_COLORS.get(mode, f"C{7 + i % 3}")
            label = f"ours: {MODE_LABELS.get(mode, mode)}" + (f" ({n} laptops)" if n else "")
            os_.append((label, color, [(p.ttft_s if idx == 0 else p.token_latency_s) if p else None for p in got],
                        [p.status if p else "" for p in got]))
        bars(axes[row][1], models, os_, f"{name} ({time_unit(records, per)})", f"ours: {name}")
        log_y(axes[row][1])
    axes[0][0].legend(fontsize=7)
    axes[0][1].legend(fontsize=7)
    finish(fig, out, "Tables 3 and 8: four and three laptops, baselines vs TPI-LLM", records,
           "Baselines run on one device (the M1 in the paper); hatched = OOM. Log scale. The paper's claims: "
           "TPI-LLM cuts TTFT and token latency by >80% vs Accelerate and >90% vs Transformers.")


@figure("window_sweep")
def window_sweep(records: list[dict], tables: dict, out: Path) -> None:
    """Token latency and peak memory vs the window size."""
    points = [p for p in aggregate(records) if window_of(p.rec) is not None]
    if not points:
        raise NoData("no runs with a sliding window (options.window)")
    mu, mscale = mem_unit([p.peak_bytes for p in points])
    fig, axes = new_figure(1, 2, 12, 4.8)
    lines = sweep_lines(points, window_of, ("window",), lambda p: p.token_latency_s)
    plot_lines(axes[0][0], lines)
    axes[0][0].set_ylabel(f"token latency ({time_unit(records, 's/token')})")
    lines = sweep_lines(points, window_of, ("window",), lambda p: p.peak_bytes)
    plot_lines(axes[0][1], lines, scale=mscale, mark_failed=False)
    axes[0][1].set_ylabel(f"peak memory, max over devices ({mu})")
    for ax in axes[0]:
        ax.set_xlabel("window w (blocks)")
        integer_x(ax)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    finish(fig, out, "Window sweep: latency and memory vs window size", records,
           "ours only: the paper never measures latency against the window; it reports memory at w=2 and "
           "w=4 (Tables 2, 6) and notes that at w=2 I/O was not fully hidden for small models.")


_ROUTE_LINKS = {"klonet": 4, "star": 2, "full": 1}


@figure("link_latency_sweep")
def link_latency_sweep(records: list[dict], tables: dict, out: Path) -> None:
    """Token latency vs per-link latency, per allreduce algorithm, with the paper's link model."""
    points = [p for p in aggregate(records) if link_latency_ms(p.rec) is not None]
    if not points:
        raise NoData("no runs with a link latency")
    fig, axes = new_figure(1, 1, 8.5, 5.5)
    ax = axes[0][0]
    lines = sweep_lines(points, link_latency_ms, ("latency_ms", "latency", "tau_ms"), lambda p: p.token_latency_s)
    plot_lines(ax, lines)
    from emulator.run.allreduce_sweep import hops

    for i, (label, pts) in enumerate(lines.items()):
        done = [(x, y, p) for x, y, p in pts if y is not None]
        if len(done) < 2:
            continue
        x0, y0, p0 = done[0]
        rec = p0.rec
        algo = _get(rec, "config", "options", "allreduce") or "star"
        layers = _get(rec, "config", "model", "config", "num_hidden_layers")
        shape = _get(rec, "config", "topology", "doc", "links", "shape")
        n = devices_of(rec)
        if not layers or not n or shape not in _ROUTE_LINKS:
            continue
        per_tau = (1 + 2 * layers * hops(algo, n)) * _ROUTE_LINKS[shape]  # broadcast of H0 + 2L allreduces
        xs = [x for x, _, _ in done]
        ax.plot(xs, [y0 + per_tau * (x - x0) / 1e3 for x in xs], ":", color=f"C{i % 10}",
                label=f"model: {label}, +{per_tau} tau per token")
    ax.set_xlabel("per-link latency tau (ms)")
    ax.set_ylabel(f"token latency ({time_unit(records, 's/token')})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    finish(fig, out, "Link-latency sweep: token latency vs per-link latency", records,
           "ours: median token latency per point (lines per allreduce algorithm). model (dotted): ours at the "
           "lowest tau plus the paper's link model per token: 2L allreduces x its hops (star 2, tree 4, ring "
           "2(N-1) at N=8) + the broadcast of the hidden state, x links per route x tau. The paper never "
           "measured end-to-end latency against link latency.")


@figure("device_scaling")
def device_scaling(records: list[dict], tables: dict, out: Path) -> None:
    """Token latency and peak memory vs N (up to 32 devices)."""
    points = [p for p in aggregate(records) if devices_of(p.rec)]
    if not points:
        raise NoData("no runs with a device count")
    mu, mscale = mem_unit([p.peak_bytes for p in points])
    fig, axes = new_figure(1, 2, 12.5, 4.8)
    keys = ("devices.count", "world_size", "devices")
    plot_lines(axes[0][0], sweep_lines(points, devices_of, keys, lambda p: p.token_latency_s))
    axes[0][0].set_ylabel(f"token latency ({time_unit(records, 's/token')})")
    mem_lines = sweep_lines(points, devices_of, keys, lambda p: p.peak_bytes)
    plot_lines(axes[0][1], mem_lines, scale=mscale, mark_failed=False)
    for i, (label, pts) in enumerate(mem_lines.items()):
        rec = pts[-1][2].rec
        w = window_of(rec)
        dims = _get(rec, "config", "model", "config")
        formula = [(x, paper_formula_bytes(dims, int(x), w)) for x, _, _ in pts] if w and dims else []
        formula = [(x, b) for x, b in formula if b]
        if formula:
            axes[0][1].plot([x for x, _ in formula], [b / mscale for _, b in formula], "--", color=f"C{i % 10}",
                            alpha=0.6, label=f"paper formula: {label}")
    axes[0][1].set_ylabel(f"peak memory, max over devices ({mu})")
    for ax in axes[0]:
        ax.set_xlabel("devices N")
        integer_x(ax)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    finish(fig, out, "Device scaling: latency and memory vs devices (beyond the paper's 8)", records,
           "ours: median token latency and max peak RSS per point; paper formula (dashed): its peak-memory "
           "formula for the model we ran at our window. The paper stops at 8 devices.")


def _measured_stall(rec: dict) -> float | None:
    """Stall seconds per token on the device that stalled most: the mean over the window scheduler's
    decode steps (`window[device].steps` after the first, which also prefills), else the run's
    time_split stall_s / tokens."""
    per_device = []
    for w in (rec.get("window") or {}).values():
        steps = (w or {}).get("steps") or []
        vals = [st["stall_s"] for st in (steps[1:] or steps) if isinstance(st.get("stall_s"), (int, float))]
        if vals:
            per_device.append(statistics.mean(vals))
    if per_device:
        return max(per_device)
    tokens = len(rec.get("tokens") or [])
    stalls = [(s or {}).get("stall_s") for s in (rec.get("time_split") or {}).values()]
    stalls = [s for s in stalls if s is not None]
    return max(stalls) / tokens if stalls and tokens else None


def _predicted_stall(rec: dict) -> tuple[float, str] | None:
    """(stall per token, how it was predicted): the planner's a-priori prediction when the line carries
    one (`prediction.stall_per_token_s`, a number or {device: number}); else the scheduler's replay
    (tpicore.scheduler.simulate_window) on this run's measured per-block times (`window[device].steady.
    measured`: t_attn, t_ffn, t_ar, tau_attn, tau_ffn), the device that stalls most."""
    pred = _get(rec, "prediction", "stall_per_token_s")
    if isinstance(pred, dict):
        vals = [v for v in pred.values() if isinstance(v, (int, float))]
        if vals:
            return max(vals), "planner"
    elif isinstance(pred, (int, float)):
        return float(pred), "planner"
    window, layers = window_of(rec), _get(rec, "config", "model", "config", "num_hidden_layers")
    if not window or not layers:
        return None
    try:
        from tpicore.runtime.window import retained_layers, simulate_window
    except ImportError:
        return None
    kept = retained_layers(layers, _get(rec, "config", "options", "retain_every") or 0)
    retained = [kind == "ffn" and layer in kept for layer in range(layers) for kind in ("attn", "ffn")]
    best = None
    for w in (rec.get("window") or {}).values():
        m = _get(w, "steady", "measured")
        if not m or any(m.get(k) is None for k in ("t_attn", "t_ffn", "t_ar", "tau_attn", "tau_ffn")):
            continue
        hold = [m["t_attn"] + m["t_ar"], m["t_ffn"] + m["t_ar"]] * layers
        load = [m["tau_attn"], m["tau_ffn"]] * layers
        stall = simulate_window(hold, load, window, retained)[-1]
        best = stall if best is None else max(best, stall)
    return (best, "replay of measured block times") if best is not None else None


def _steady_verdict(rec: dict) -> str:
    """'tight', 'loose' or 'neither': the paper's conditions as the scheduler checked them (worst device)."""
    verdicts = [_get(w, "steady") for w in (rec.get("window") or {}).values()]
    verdicts = [v for v in verdicts if isinstance(v, dict) and "tight" in v]
    if not verdicts:
        return "unknown"
    if all(v["tight"] for v in verdicts):
        return "tight"
    return "loose" if all(v.get("loose") for v in verdicts) else "neither"


@figure("stall_prediction")
def stall_prediction(records: list[dict], tables: dict, out: Path) -> None:
    """Predicted stall per token against the measured one, per model and setting, marked by which of
    the paper's steady conditions held."""
    rows = []
    for p in aggregate(records):
        meas = [m for m in (_measured_stall(r) for r in p.ok) if m is not None]
        preds = [x for x in (_predicted_stall(r) for r in p.ok) if x is not None]
        if not meas or not preds:
            continue
        label = model_name(p.rec)
        rest = series_label(p.point, {k for k in p.point if k.endswith(("paper_model", "model", "synth"))})
        rows.append((f"{label}\n{rest}" if rest != "ours" and rest != label else label,
                     statistics.median(x for x, _ in preds), statistics.median(meas), preds[-1][1],
                     _steady_verdict(p.rec)))
    if not rows:
        raise NoData("no completed runs with both a measured stall (window steps or time_split) and a "
                     "prediction (prediction.stall_per_token_s, or window[*].steady.measured to replay)")
    fig, axes = new_figure(1, 2, 14, 5.5)
    ax = axes[0][0]
    top = max(max(r[1], r[2]) for r in rows) * 1.1 or 1.0
    ax.plot([0, top * 1e3], [0, top * 1e3], "--", color="0.5", label="measured = predicted")
    markers = {"tight": "o", "loose": "^", "neither": "x", "unknown": "s"}
    for verdict, marker in markers.items():
        mine = [r for r in rows if r[4] == verdict]
        if mine:
            ax.scatter([r[1] * 1e3 for r in mine], [r[2] * 1e3 for r in mine], marker=marker, color="C3",
                       label=f"steady condition: {verdict}" if verdict != "unknown" else "conditions not recorded")
    for label, pred, meas, _, _ in rows:
        ax.annotate(label.replace("\n", " "), (pred * 1e3, meas * 1e3), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    how = sorted({r[3] for r in rows})
    ax.set_xlabel(f"predicted stall per token (ms; {', '.join(how)})")
    ax.set_ylabel(f"measured stall per token ({time_unit(records, 'ms')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    never = [False] * len(rows)
    bars(axes[0][1], [r[0] for r in rows], [("predicted", "C0", [r[1] * 1e3 for r in rows], never),
                                            ("ours: measured", "C3", [r[2] * 1e3 for r in rows], never)],
         "stall per token (ms)", "per model and setting")
    axes[0][1].legend(fontsize=8)
    finish(fig, out, "Stall prediction: the steady conditions against measured stalls", records,
           "predicted: tpicore.planner's a-priori replay of the window when the line carries it, else the same "
           "replay (scheduler.simulate_window) on the run's measured block times; the device that stalls most. "
           "measured: mean stall of the scheduler's decode steps, max over devices, median over runs. Markers: "
           "which of the paper's steady conditions (tight / loose) held. The paper states the conditions but "
           "measures no stall.")


# ---------------------------------------------------------------------------------------------------
# Entry


def plot_experiments(names: list[str], results: Path, out_dir: Path, tables_path: Path | None = None,
                     quiet: bool = False) -> int:
    """Draw each named figure from results/<name>.jsonl; returns how many were written."""
    tables = load_tables(tables_path)
    written = 0
    for name in names:
        path = results / f"{name}.jsonl"
        if not path.is_file():
            print(f"{name}: skipped: no results ({path} does not exist; run the experiment first, "
                  f"e.g. `python -m emulator reproduce --experiment {name}`)", file=sys.stderr)
            continue
        records = latest_sweeps([r for r in read_records(path) if r.get("experiment", name) == name])
        if not records:
            print(f"{name}: skipped: {path} holds no lines of experiment {name}", file=sys.stderr)
            continue
        out = out_dir / f"{name}.png"
        try:
            FIGURES[name](records, tables, out)
        except NoData as e:
            print(f"{name}: skipped: {path}: {e}", file=sys.stderr)
            continue
        written += 1
        if not quiet:
            print(f"{name}: {out} ({len(records)} lines)")
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every figure that has results")
    which.add_argument("--experiment", action="append", metavar="NAME", choices=sorted(FIGURES),
                       help=f"one figure (repeatable): {', '.join(FIGURES)}")
    p.add_argument("--results", metavar="DIR", help="results folder (default: results/ in the checkout)")
    p.add_argument("--out", metavar="DIR", help="figures folder (default: <results>/figures)")
    p.add_argument("--paper-tables", metavar="YAML", help=f"the paper's tables (default: {DEFAULT_TABLES})")
    p.add_argument("--quiet", action="store_true", help="only report what was skipped")


def run(args: argparse.Namespace) -> int:
    """0 when at least one figure was written, 1 when none could be."""
    results = Path(args.results) if args.results else DEFAULT_RESULTS
    out = Path(args.out) if args.out else results / "figures"
    names = list(FIGURES) if args.all else args.experiment
    written = plot_experiments(names, results, out, Path(args.paper_tables) if args.paper_tables else None,
                               quiet=args.quiet)
    if not written:
        print(f"error: no figure could be drawn from {results}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulator.plot", description="figures from results/*.jsonl")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
