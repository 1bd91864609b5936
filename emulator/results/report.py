"""The summary table of a run config's results, printed after it ran (`python -m emulator run`).

Layer: results (imports emulator.results.record only). Reads typed RunRecords (emulator/results/record.py
owns the line, its writer and its reader). Must not write results, run anything or plot.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from emulator.results.record import RunRecord, RunSetting

MiB = 2**20
TIME_KEYS = ("compute_s", "comm_s", "load_s", "stall_s")


def _mean(xs: Iterable[float | None]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _fmt(x: float | None, spec: str = "8.3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{int(spec.split('.')[0])}}"
    return format(x, spec)


def describe(s: RunSetting) -> str:
    """One line saying what was emulated."""
    lat = sorted({link.latency_ms for link in s.links.values()})
    bw = sorted({link.bandwidth_mbps or math.inf for link in s.links.values()})
    lat_s = f"{lat[0]:g} ms" if len(lat) == 1 else f"{lat[0]:g}-{lat[-1]:g} ms"
    bw_s = ("unlimited" if bw[0] == math.inf else f"{bw[0]:g} Mbit/s") if len(bw) == 1 \
        else f"{bw[0]:g}-{bw[-1]:g} Mbit/s"
    dims, m = s.model.dims, s.model
    mdl = f"{m.name} ({dims.get('num_hidden_layers', '?')} layers, hidden {dims.get('hidden_size', '?')}, " \
          f"{m.dtype or '?'})"
    window = f"window {s.window}" if s.window else "no window"
    compute = ", compute free" if s.compute == "free" else ""
    unique = f", {m.unique_layers} unique layers" if m.unique_layers else ""
    if s.world_size == 1:
        return f"{s.mode}: 1 device ({s.devices[0].name} of {s.topology}), {mdl}{unique}, {window}, " \
               f"{s.clock} clock{compute}"
    comm = "pipeline" if s.mode == "pipeline" else f"{s.allreduce} allreduce"
    return (f"{s.mode}: {s.world_size} devices on {s.topology} links ({lat_s}, {bw_s} per link), {mdl}{unique}, "
            f"{comm}, {window}, {s.clock} clock{compute}")


def summary(records: Sequence[RunRecord], wall_s: float | None = None, results_path: str | None = None) -> str:
    """The table printed after a run config: per run TTFT / token latency, then per device peak memory
    and time split (summed over runs), then OOMs and errors."""
    if not records:
        return "no runs recorded"
    s = records[0].setting
    unit = "s" if s.clock == "wall" else "s (virtual)"
    out = [f"experiment {records[0].experiment}: {describe(s)}", ""]
    out.append(f"{'run':>4} {'prompt':>6} {'tokens':>6} {'TTFT':>10} {'token lat.':>10} {'wall':>8}   [{unit}]")
    for r in records:
        note = "  OOM: " + ", ".join(o.device for o in r.oom) if r.oom else ""
        if r.error and not r.oom:
            note = "  error"
        out.append(f"{r.run + 1:>4} {r.prompt_len:>6} {len(r.timings.tokens):>6} {_fmt(r.ttft_s, '10.3f')} "
                   f"{_fmt(r.token_latency_s, '10.3f')} {_fmt(r.wall_s, '8.1f')}{note}")
    ok = [r for r in records if not r.error]
    if len(ok) > 1:
        out.append(f"{'mean':>4} {'':>6} {'':>6} {_fmt(_mean(r.ttft_s for r in ok), '10.3f')} "
                   f"{_fmt(_mean(r.token_latency_s for r in ok), '10.3f')} "
                   f"{_fmt(_mean(r.wall_s for r in ok), '8.1f')}")
    out.append("")
    devices = [d.name for d in s.devices]
    extrapolated = any(d.peak_mem_bytes > d.peak_rss_bytes for r in records for d in r.devices.values())
    mem_head = "memory MiB*" if extrapolated else "peak RSS MiB"
    out.append(f"{'device':>8} {mem_head:>12} {'cap MiB':>9} {'compute':>9} {'comm':>9} {'load':>9} "
               f"{'stall':>9}   [{unit}, all runs]")
    for name in devices:
        mine = [r.devices[name] for r in records if name in r.devices]
        peak = max((max(d.peak_rss_bytes, d.peak_mem_bytes) for d in mine), default=0)
        split = {k: sum(getattr(d.time_split, k) for d in mine if d.time_split is not None) for k in TIME_KEYS}
        cap = s.mem_caps_bytes.get(name)
        out.append(f"{name:>8} {peak / MiB:>12.1f} {_fmt(cap / MiB if cap else None, '9.0f')} "
                   f"{split['compute_s']:>9.3f} {split['comm_s']:>9.3f} {split['load_s']:>9.3f} "
                   f"{split['stall_s']:>9.3f}")
    if extrapolated:
        out.append("* measured peak RSS + the repeated layers of the unique-layer model (resident weights)")
    over = sorted({n for r in records for n in r.mem_over_cap if not r.oom})
    if over:
        out.append(f"over their memory cap (would run out of memory): {', '.join(over)}")
    problems = [r for r in records if r.error]
    if problems:
        out.append("")
        for r in problems:
            out.append(f"run {r.run + 1}: {r.error}")
    late = records[-1].links.late if records[-1].links else 0
    if s.clock == "wall" and late:
        out.append(f"note: {late} messages reached the master more than 1 ms after their deadline "
                   f"(the host was too busy for wall-clock emulation; try clock: virtual)")
    for w in s.warnings:
        out.append(f"note: {w}")
    tail = []
    if results_path:
        tail.append(f"results: {results_path} (+{len(records)} line{'s' if len(records) != 1 else ''})")
    if wall_s is not None:
        tail.append(f"wall time {wall_s:.1f} s")
    if tail:
        out += ["", "; ".join(tail)]
    return "\n".join(out)
