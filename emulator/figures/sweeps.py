"""Sweeps drawn as lines: Fig. 5 (devices, cores, bandwidth), the window, link latency and device-count sweeps.

Layer: figures (imports emulator.figures.data / style, emulator.config.collective_model,
emulator.results.record). One function per figure, each (records, paper tables, output path) -> writes the
PNG or raises NoData. Must not read files.

    figure             point keys / config                            measurements
    fig5_scaling       one of devices / cores|speed / bandwidth per   token_latency_s
                       point (or point.panel)
    window_sweep       options.window                                 token_latency_s, peak_mem_bytes
    link_latency_sweep links latency, options.allreduce, model dims   token_latency_s
    device_scaling     devices                                        token_latency_s, peak_mem_bytes
"""

from __future__ import annotations

from pathlib import Path

from emulator.config.collective_model import ROUTE_LINKS, hops
from emulator.figures.data import (
    NoData,
    aggregate,
    bandwidth_mbps,
    cores_of,
    devices_of,
    link_latency_ms,
    paper_formula_bytes,
    point_value,
    time_unit,
    window_of,
)
from emulator.figures.style import (
    finish,
    integer_x,
    mem_unit,
    new_figure,
    plot_lines,
    sweep_lines,
)
from emulator.results.record import RunRecord


def _fig5_panel(rec: RunRecord) -> str | None:
    """The panel of a Fig. 5 point: its `panel` label, else the kind of key it varies."""
    if rec.point.get("panel"):
        return str(rec.point["panel"])
    if point_value(rec.point, "devices.count", "world_size"):
        return "devices"
    if point_value(rec.point, "cores", "speed"):
        return "cores"
    if point_value(rec.point, "bandwidth_mbps", "bandwidth"):
        return "bandwidth"
    return None


def fig5_scaling(records: list[RunRecord], tables: dict, out: Path) -> None:
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


def window_sweep(records: list[RunRecord], tables: dict, out: Path) -> None:
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


def link_latency_sweep(records: list[RunRecord], tables: dict, out: Path) -> None:
    """Token latency vs per-link latency, per allreduce algorithm, with the paper's link model."""
    points = [p for p in aggregate(records) if link_latency_ms(p.rec) is not None]
    if not points:
        raise NoData("no runs with a link latency")
    fig, axes = new_figure(1, 1, 8.5, 5.5)
    ax = axes[0][0]
    lines = sweep_lines(points, link_latency_ms, ("latency_ms", "latency", "tau_ms"), lambda p: p.token_latency_s)
    plot_lines(ax, lines)
    for i, (label, pts) in enumerate(lines.items()):
        done = [(x, y, p) for x, y, p in pts if y is not None]
        if len(done) < 2:
            continue
        x0, y0, p0 = done[0]
        s = p0.rec.setting
        layers = s.model.layers
        if not layers or s.shape not in ROUTE_LINKS:
            continue
        per_tau = (1 + 2 * layers * hops(s.allreduce, s.world_size)) * ROUTE_LINKS[s.shape]  # H0 + 2L allreduces
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


def device_scaling(records: list[RunRecord], tables: dict, out: Path) -> None:
    """Token latency and peak memory vs N (up to 32 devices)."""
    points = aggregate(records)
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
        dims = rec.setting.model.dims
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
