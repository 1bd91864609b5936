"""Figures 1 and 3 of the paper: where a token's time goes, peak memory against N, allreduce latency against tau.

Layer: figures (imports emulator.figures.data / style, emulator.results.record). One function per figure,
each (records, paper tables, output path) -> writes the PNG or raises NoData. Must not read files.

    figure            point keys / config                             measurements
    fig1_timeline     options.mode (tpi | pipeline)                   devices' trace (with options.trace),
                                                                      time_split
    fig1_memory       devices, options.window, model dims             peak_mem_bytes
    fig3_allreduce    AllreduceRecord point {algo, tau_ms, clock,     latency_median_s, latency_p99_s,
                      devices}                                        model_s, paper_model_s
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.patches import Patch

from emulator.figures.data import (
    NoData,
    aggregate,
    devices_of,
    mode_of,
    model_name,
    paper_formula_bytes,
    time_unit,
    window_of,
)
from emulator.figures.style import (
    CATEGORY_COLORS,
    MODE_LABELS,
    OTHER_COLOR,
    finish,
    integer_x,
    mark_oom,
    mem_unit,
    new_figure,
    ordered_models,
)
from emulator.results.record import AllreduceRecord, RunRecord


def fig1_timeline(records: list[RunRecord], tables: dict, out: Path) -> None:
    """Gantt of one token per rank, TP (tpi) beside pipeline, and each mode's time shares."""
    by_mode: dict[str, list[RunRecord]] = {}
    for r in records:
        by_mode.setdefault(mode_of(r), []).append(r)
    modes = [m for m in ("tpi", "pipeline") if m in by_mode] + [m for m in by_mode if m not in ("tpi", "pipeline")]
    if not modes:
        raise NoData("no runs")
    clock = " (virtual clock)" if time_unit(records).endswith("virtual clock") else ""
    fig, axes = new_figure(1, len(modes) + 1, 5 * len(modes) + 4, 4.5)
    any_trace = False
    for ax, m in zip(axes[0], modes):
        traced = [r for r in by_mode[m] if any(d.trace for d in r.devices.values())]
        ax.set_title(f"{MODE_LABELS.get(m, m)}: one token", fontsize=10)
        if not traced:
            ax.text(0.5, 0.5, "no trace in these records\n(run with options.trace: true)", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        any_trace = True
        events = {name: d.trace for name, d in traced[-1].devices.items() if d.trace}
        names = list(events)
        t0 = min((e.start_s for evs in events.values() for e in evs), default=0.0)
        for row, name in enumerate(names):
            for e in events[name]:
                ax.broken_barh([((e.start_s - t0) * 1e3, e.duration_s * 1e3)], (row - 0.4, 0.8),
                               facecolors=CATEGORY_COLORS.get(e.category, OTHER_COLOR))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_xlabel(f"time since the token's first event (ms{clock})")
        ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=k) for k, c in CATEGORY_COLORS.items()]
    ax = axes[0][-1]
    shares = []
    for m in modes:
        tot = {k: 0.0 for k in CATEGORY_COLORS}
        for r in by_mode[m]:
            for d in r.devices.values():
                if d.time_split is not None:
                    for k in tot:
                        tot[k] += getattr(d.time_split, f"{k}_s")
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


def fig1_memory(records: list[RunRecord], tables: dict, out: Path) -> None:
    """Peak memory per device vs N: TP without the scheduler, the paper's formula, TPI (with it)."""
    points = aggregate(records)
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
                mark_oom(ax, n, p.peak_bytes / scale if p.peak_bytes else None, p, color)
        dims = mine[-1].rec.setting.model.dims
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


def fig3_allreduce(records: list[AllreduceRecord], tables: dict, out: Path) -> None:
    """Allreduce latency vs per-link latency tau: measured points, the hop model as lines."""
    if not records:
        raise NoData("no lines with point.algo and point.tau_ms (written by emulator/run/allreduce_sweep.py)")
    n = max(r.point.devices for r in records)
    recs = [r for r in records if r.point.devices == n]
    fig, axes = new_figure(1, 1, 8, 5.5)
    ax = axes[0][0]
    algos = [a for a in ("star", "tree", "ring") if any(r.point.algo == a for r in recs)]
    for i, algo in enumerate(algos):
        color = f"C{i}"
        mine = [r for r in recs if r.point.algo == algo]
        model = sorted({(r.point.tau_ms, r.paper_model_s if r.paper_model_s is not None else r.model_s)
                        for r in mine})
        paper = all(r.paper_model_s is not None for r in mine)
        if model:
            k = next((m / (t * 1e-3) for t, m in model if t), None)
            what = f"paper model {k:.0f} tau" if paper and k else (f"hop model {k:.0f} tau" if k else "hop model")
            ax.plot([t for t, _ in model], [m * 1e3 for _, m in model], "-", color=color, alpha=0.6,
                    label=f"{algo}: {what}")
        for clock, marker, fill in (("virtual", "o", color), ("wall", "s", "none")):
            pts = sorted((r.point.tau_ms, r.latency_median_s, r.latency_p99_s)
                         for r in mine if r.point.clock == clock and r.latency_median_s is not None)
            if not pts:
                continue
            xs, med = [p[0] for p in pts], [p[1] * 1e3 for p in pts]
            hi = [max(0.0, (p99 - median) * 1e3) for _, median, p99 in pts]  # both exist once a trial did
            ax.errorbar(xs, med, yerr=[[0] * len(hi), hi], fmt=marker, color=color, mfc=fill, ms=5, capsize=2,
                        label=f"{algo}: ours, {clock} clock (median, bar to p99)")
        for r in mine:
            if r.error:
                ax.annotate("error", (r.point.tau_ms, 0), color=color, fontsize=7)
    ax.set_xlabel("per-link latency tau (ms)")
    ax.set_ylabel("allreduce latency, 4-byte payload (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    finish(fig, out, f"Fig. 3: allreduce latency vs link latency ({n} devices)", records,
           "paper model: link traversals on the critical path x tau (star 8, tree 16, ring 56 at 8 devices "
           "on Klonet; the hop count of our collectives for other N). ours: the same allreduce over the "
           "emulated links; virtual clock = link model only, wall clock = real waits on this host.")
