"""The paper's tables beside ours: Table 1 (scheduler off / on), Tables 2 and 6 (memory vs N), Fig. 6 and
Tables 3 / 8 (baselines).

Layer: figures (imports emulator.figures.data / style, emulator.results.record). One function per figure,
each (records, paper tables, output path) -> writes the PNG or raises NoData; the paper's numbers come from
configs/paper_tables.yaml. Must not read files.

    figure            point keys / config                             measurements
    table1            paper model, options.window (null = off)        ttft_s, token_latency_s, peak_mem_bytes
    table2_6_memory   paper model, devices, options.window            peak_mem_bytes
    fig6_baselines    paper model, options.mode                       ttft_s, token_latency_s
    table3_laptops    paper model, options.mode, devices or testbed   ttft_s, token_latency_s
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from emulator.figures.data import (
    NoData,
    Point,
    aggregate,
    devices_of,
    mode_of,
    model_name,
    point_value,
    time_unit,
    window_of,
)
from emulator.figures.style import (
    MODE_COLORS,
    MODE_LABELS,
    MODES,
    PAPER_TABLE3,
    bars,
    finish,
    integer_x,
    log_y,
    mark_oom,
    mem_unit,
    new_figure,
    ordered_models,
)
from emulator.results.record import RunRecord


def _paper(tables: dict, *path: str) -> Any:
    """A value of the paper's tables (configs/paper_tables.yaml) by its path; None where it has none."""
    d: Any = tables
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _table1_paper(tables: dict) -> dict[str, dict[str, list | None]]:
    return {k: _paper(tables, "table1", k) or {} for k in ("scheduler_off", "scheduler_on")}


def table1(records: list[RunRecord], tables: dict, out: Path) -> None:
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
           "Hatched = OOM, or a point that could not run (skipped); ours: /// a device was stopped at its cap, "
           "... OOM (extrap.): the run completed and only its extrapolated memory is above its cap (its times "
           "are drawn). The paper prints the memory an OOM run would need. ours: median "
           "over runs; peak memory = max over devices of peak RSS (+ the repeated layers a unique-layer model "
           "leaves out). Our models are scaled down, so compare bars within a panel, not across the two columns.")


def table2_6_memory(records: list[RunRecord], tables: dict, out: Path) -> None:
    """Peak memory vs N per model at w = 2 and 4 (and without the scheduler): paper solid, ours dashed."""
    points = aggregate(records)
    if not points:
        raise NoData("no runs with a device count")
    pn = _paper(tables, "peak_memory", "devices") or []
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
            vals = _paper(tables, "peak_memory", wk, sk, model)
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
                mark_oom(twin, n, p.peak_bytes / mscale if p.peak_bytes else None, p, color)
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


def fig6_baselines(records: list[RunRecord], tables: dict, out: Path) -> None:
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
           "ours: median over runs; hatched = OOM (/// stopped at its cap; ... extrapolated: ran, memory only "
           "extrapolates over the cap), skipped (cannot run) or error. paper: Fig. 6's bars are "
           "not tabulated; its TPI-LLM values are Table 1's (right). Its claims: TPI-LLM beats Standalone, "
           "MP (pipeline) and Galaxy; Galaxy's ring is slower than MP.")


def _laptops(rec: RunRecord) -> int:
    """The laptop count of a point: its `testbed` label's digits (laptops3), else the devices that ran."""
    hit = point_value(rec.point, "testbed")
    if hit:
        digits = "".join(c for c in str(hit[1]) if c.isdigit())
        if digits:
            return int(digits)
    return devices_of(rec)


def table3_laptops(records: list[RunRecord], tables: dict, out: Path) -> None:
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
           "Baselines run on one device (the M1 in the paper); hatched = OOM (/// stopped at its cap, ... "
           "extrapolated). Log scale. The paper's claims: "
           "TPI-LLM cuts TTFT and token latency by >80% vs Accelerate and >90% vs Transformers.")
