"""Results of emulation runs: one JSON line per run in results/<experiment>.jsonl, and the summary table.

A line (one run = one prompt of one repetition):

    experiment          the run config's name (an experiment's name for every point of its sweep)
    point               {override key: value} of the sweep point (emulator/experiments.py); {} for a plain run
    mode                options.mode: tpi | galaxy | pipeline | standalone | offload | standalone+ms
    run, prompt_len, repetition
    config              fully resolved: topology (document, devices, links), model (spec, folder, dims),
                        workload, options, clock, host (cores, memory, Python/NumPy versions, git commit)
    tokens              generated token ids (greedy)
    ttft_s              time to first token (prefill + first sample); the master's clock: virtual
                        seconds with clock: virtual, real seconds with clock: wall
    token_latencies_s   each later token's latency; token_latency_s is their mean
    peak_rss_bytes      {device: peak RSS} -- the kernel's high-water mark (VmHWM) of the device
                        process since it started, so it covers the weights' load and every earlier run
    peak_mem_bytes      {device: bytes} the memory to compare with the paper: peak_rss_bytes, plus, for
                        resident weights of a unique-layer model, the repeated layers a real model
                        would hold (emulator/baselines.py resident_extra_bytes); equal otherwise
    mem_over_cap        [device]: peak_mem_bytes above the device's cap -- such a device runs out of
                        memory (measured ones are also in `oom`; extrapolated ones ran to the end, so
                        their times are what a device with enough memory would see)
    time_split          {device: {compute_s, comm_s, load_s, stall_s, loads, loaded_bytes, stalls}} this
                        run only, on the device's clock (compute excludes allreduce time inside blocks).
                        load_s: reading weights (window: on the loader thread, overlapping compute;
                        offload: blocking, so also counted in stall_s); stall_s: waiting for weights;
                        pipeline: comm_s is the time a stage waits for its input (other stages' compute
                        included) plus sending its output
    window              {device: the window scheduler's statistics}: per-step split (`steps`, this run's
                        steps), per-block averages (`blocks`), the paper's steady conditions checked on
                        them (`steady`: tight, loose, measured t_attn, t_ffn, t_ar, tau_attn, tau_ffn);
                        devices without a window are left out
    trace               {device: [[name, category, start_s, duration_s], ...]} with options.trace (device
                        clock: compute, comm, load, stall events); {} otherwise
    page_cache_bytes    {device: bytes of its weight files in the host's page cache} (not in RSS)
    oom                 [] or [{device, rss_bytes, cap_bytes}]: devices stopped for exceeding their cap
    error               null, or why the run did not complete
    wall_s              real seconds the run took on this host
    links               the master's link-shaper counters (messages, late deliveries in wall mode)
    time                when the run ended (UTC, ISO 8601)

Lines are appended with one write() on an O_APPEND descriptor, so concurrent experiments writing the
same file never interleave within a line.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

MiB = 2**20


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line, atomically (a single write with O_APPEND)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
    finally:
        os.close(fd)
    if written != len(line):  # a full disk; never leave half a line unexplained
        raise OSError(f"{path}: wrote {written} of {len(line)} bytes")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def host_info() -> dict:
    """What the numbers were measured on."""
    import platform

    import numpy as np

    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    info["git_commit"] = _git_commit()
    return info


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        head = (root / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = root / ".git" / head[5:]
            if ref.exists():
                return ref.read_text().strip()
            for line in (root / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(" " + head[5:]):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------------
# The summary table


def _mean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _fmt(x: float | None, spec: str = "8.3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{int(spec.split('.')[0])}}"
    return format(x, spec)


def describe(config: dict) -> str:
    """One line saying what was emulated."""
    topo, model, opt = config["topology"], config["model"], config["options"]
    links = topo["links"].values()
    lat = sorted({link["latency_ms"] for link in links})
    bw = sorted({link["bandwidth_mbps"] or math.inf for link in links})
    lat_s = f"{lat[0]:g} ms" if len(lat) == 1 else f"{lat[0]:g}-{lat[-1]:g} ms"
    bw_s = ("unlimited" if bw[0] == math.inf else f"{bw[0]:g} Mbit/s") if len(bw) == 1 \
        else f"{bw[0]:g}-{bw[-1]:g} Mbit/s"
    dims = model.get("config") or {}
    name = model.get("synth") or os.path.basename(str(model.get("path", "")).rstrip("/"))
    mdl = f"{name} ({dims.get('num_hidden_layers', '?')} layers, hidden {dims.get('hidden_size', '?')}, " \
          f"{model.get('dtype', '?')})"
    window = f"window {opt['window']}" if opt.get("window") else "no window"
    compute = ", compute free" if opt.get("compute") == "free" else ""
    mode = opt.get("mode", "tpi")
    unique = f", {model['unique_layers']} unique layers" if model.get("unique_layers") else ""
    n = len(topo["devices"])
    if n == 1:
        return f"{mode}: 1 device ({topo['devices'][0]['name']} of {topo['name']}), {mdl}{unique}, {window}, " \
               f"{opt['clock']} clock{compute}"
    comm = "pipeline" if mode == "pipeline" else f"{opt['allreduce']} allreduce"
    return (f"{mode}: {n} devices on {topo['name']} links ({lat_s}, {bw_s} per link), {mdl}{unique}, "
            f"{comm}, {window}, {opt['clock']} clock{compute}")


def summary(records: list[dict], wall_s: float | None = None, results_path: str | None = None) -> str:
    """The table printed after an experiment: per run TTFT / token latency, then per device peak
    memory and time split (summed over runs), then OOMs and errors."""
    if not records:
        return "no runs recorded"
    cfg = records[0]["config"]
    unit = "s" if cfg["options"]["clock"] == "wall" else "s (virtual)"
    out = [f"experiment {records[0]['experiment']}: {describe(cfg)}", ""]
    out.append(f"{'run':>4} {'prompt':>6} {'tokens':>6} {'TTFT':>10} {'token lat.':>10} {'wall':>8}   [{unit}]")
    for r in records:
        note = "  OOM: " + ", ".join(o["device"] for o in r["oom"]) if r["oom"] else ""
        if r["error"] and not r["oom"]:
            note = "  error"
        out.append(f"{r['run'] + 1:>4} {r['prompt_len']:>6} {len(r['tokens']):>6} {_fmt(r['ttft_s'], '10.3f')} "
                   f"{_fmt(r['token_latency_s'], '10.3f')} {_fmt(r['wall_s'], '8.1f')}{note}")
    ok = [r for r in records if not r["error"]]
    if len(ok) > 1:
        out.append(f"{'mean':>4} {'':>6} {'':>6} {_fmt(_mean(r['ttft_s'] for r in ok), '10.3f')} "
                   f"{_fmt(_mean(r['token_latency_s'] for r in ok), '10.3f')} "
                   f"{_fmt(_mean(r['wall_s'] for r in ok), '8.1f')}")
    out.append("")
    devices = [d["name"] for d in cfg["topology"]["devices"]]
    caps = cfg.get("mem_caps_bytes", {})
    last = records[-1]
    extrapolated = any(r.get("peak_mem_bytes", {}).get(n, 0) > (r["peak_rss_bytes"].get(n) or 0)
                       for r in records for n in devices)
    mem_head = "memory MiB*" if extrapolated else "peak RSS MiB"
    out.append(f"{'device':>8} {mem_head:>12} {'cap MiB':>9} {'compute':>9} {'comm':>9} {'load':>9} "
               f"{'stall':>9}   [{unit}, all runs]")
    for name in devices:
        peak = max(max(r["peak_rss_bytes"].get(name) or 0, r.get("peak_mem_bytes", {}).get(name) or 0)
                   for r in records)
        split = {k: sum((r["time_split"].get(name) or {}).get(k, 0.0) for r in records)
                 for k in ("compute_s", "comm_s", "load_s", "stall_s")}
        cap = caps.get(name)
        out.append(f"{name:>8} {peak / MiB:>12.1f} {_fmt(cap / MiB if cap else None, '9.0f')} "
                   f"{split['compute_s']:>9.3f} {split['comm_s']:>9.3f} {split['load_s']:>9.3f} "
                   f"{split['stall_s']:>9.3f}")
    if extrapolated:
        out.append("* measured peak RSS + the repeated layers of the unique-layer model (resident weights)")
    over = sorted({n for r in records for n in r.get("mem_over_cap", []) if not r["oom"]})
    if over:
        out.append(f"over their memory cap (would run out of memory): {', '.join(over)}")
    problems = [r for r in records if r["error"]]
    if problems:
        out.append("")
        for r in problems:
            out.append(f"run {r['run'] + 1}: {r['error']}")
    late = last.get("links", {}).get("late", 0)
    if cfg["options"]["clock"] == "wall" and late:
        out.append(f"note: {late} messages reached the master more than 1 ms after their deadline "
                   f"(the host was too busy for wall-clock emulation; try clock: virtual)")
    for w in cfg.get("warnings", []):
        out.append(f"note: {w}")
    tail = []
    if results_path:
        tail.append(f"results: {results_path} (+{len(records)} line{'s' if len(records) != 1 else ''})")
    if wall_s is not None:
        tail.append(f"wall time {wall_s:.1f} s")
    if tail:
        out += ["", "; ".join(tail)]
    return "\n".join(out)
