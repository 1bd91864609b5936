"""The link shapers measured: their overhead, wall mode against its own model, and the two backends side by side.

    --part overhead   the raw transport vs the same transport with the user-space link hook (two
                      processes ping-pong a small tensor; one-way = round trip / 2, median), and the
                      hook's own cost in one process (on_send + on_recv, no sockets):
                          raw          no link hook
                          ideal link   LinkShaper on a 0 ms, unlimited link (the fast path: no lock)
                          0 ms 10 Gb/s LinkShaper on a 0 ms, 10 Gbit/s link (lock + booking per message)
                          klonet 0 ms  4 hops of 0 ms, 10 Gbit/s links (a booking on every hop)
    --part wall       wall-mode self-tests (moved here from tests/test_shaper.py: how late a frame is
                      seen depends on the host): expected, measured, tolerance, within or OUTSIDE
    --part backends   the same transfer patterns on the user-space shaper and on the kernel backend
                      (namespaces + tbf + the user-space delay stage; needs root), with the link model's
                      exact time (the same pattern on virtual clocks) beside them, at each --rates:
                          rtt      64-byte ping-pong, one-way time
                          bulk     1 MiB, one sender (transfer time; median of BULK_REPS); for the kernel
                                   also the time from its first byte (the sender seals a frame before any
                                   byte enters the kernel, while the user-space shaper's link time starts
                                   at the send and overlaps the sealing: host time, not link time)
                          incast   64 KiB from each of N-1 devices into device 0 at once, the senders' start
                                   spun (last arrival; median of INCAST_REPS)
                          step     a tensor-parallel decode step's traffic: 2 x layers star allreduces of
                                   a hidden-size fp32 vector (what bounds token latency when compute is small)
    --part experiment the same tiny experiment (python -m emulator run: tensor parallel, wall clock) with
                      options.shaper user and kernel at each --rates: TTFT and token latency side by side

    python benchmarks/bench_shaper.py [--part all] [--devices 4] [--rates 10,300] [--latency-ms 1]
        [--layers 22] [--hidden 2048] [--model tiny] [--out results/bench_shaper.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from emulator.config.run_config import load_run_config
from emulator.config.topology import Link, Machine, Topology, make_topology
from emulator.net.clock import WallClock
from emulator.net.hybrid import DelayStage
from emulator.net.kernel import unavailable
from emulator.net.links import BURST_BYTES
from emulator.net.netrun import run_on_network
from emulator.net.network import make_network
from emulator.net.schedule import LinkSchedule
from emulator.net.scripted import Recv, Send, run_script
from emulator.net.shaper import LinkShaper
from emulator.run.launcher import Run
from tpicore.comm.collectives import allreduce, broadcast
from tpicore.comm.frame import HEADER_NBYTES, TAG_NBYTES, Kind
from tpicore.comm.group import Group
from tpicore.comm.local import run_local_processes

MiB = 2**20
BULK_REPS = 5  # backends: 1 MiB messages per round (median)
INCAST_REPS = 7  # backends: incasts per round (median of their last arrivals)


def _devices(n: int) -> list[Machine]:
    return [Machine(f"d{i}", cores=1, mem_bytes=2**30) for i in range(n)]


def sealed(payload: int) -> int:
    """Wire bytes of one sealed frame (header + tag, payload + tag): what the link hook charges."""
    return HEADER_NBYTES + TAG_NBYTES + payload + (TAG_NBYTES if payload else 0)


# ---------------------------------------------------------------------------------------------------
# overhead

def overhead_configs() -> dict[str, Topology | None]:
    fast = Link(latency_ms=0, bandwidth_mbps=10_000)
    return {"raw": None, "ideal link": make_topology(_devices(2), "full", Link()),
            "0 ms 10 Gb/s": make_topology(_devices(2), "full", fast), "klonet 0 ms": make_topology(_devices(2), "klonet", fast)}


def ping_pong_loopback(topology: Topology | None, iters: int, payload: int) -> list[float]:
    """Round-trip seconds of `iters` ping-pongs between rank 0 and rank 1 over loopback."""
    schedule = LinkSchedule.create(len(topology.links)) if topology is not None else None

    def device(group: Group) -> list[float]:
        if topology is not None:
            group.link_hook = LinkShaper(topology, schedule, group.rank, WallClock())
        x = np.zeros(payload // 4, np.float32)
        ch = group.channel(1 - group.rank)
        rtts = []
        for i in range(iters + 50):  # the first 50 warm up
            if group.rank == 0:
                t = time.perf_counter()
                ch.send_array(Kind.TENSOR, x)
                ch.recv_into(x)
                if i >= 50:
                    rtts.append(time.perf_counter() - t)
            else:
                ch.recv_into(x)
                ch.send_array(Kind.TENSOR, x)
        return rtts

    try:
        return run_local_processes(2, device, mesh=False, timeout_s=60)[0]
    finally:
        if schedule is not None:
            schedule.close()


def hook_cost(topology: Topology, iters: int, nbytes: int) -> float:
    """Seconds per on_send + on_recv pair in one process (no transport)."""
    with LinkSchedule.create(len(topology.links)) as schedule:
        shaper = LinkShaper(topology, schedule, 0, WallClock())
        t = time.perf_counter()
        for _ in range(iters):
            t_send = shaper.now()
            t_deliver = shaper.on_send(0, 1, nbytes)
            shaper.on_recv(0, 1, nbytes, t_send, t_deliver)
        return (time.perf_counter() - t) / iters


def part_overhead(args: argparse.Namespace) -> dict:
    rows = {}
    print(f"\n# overhead: one-way time per message, {args.payload}-byte payload, median of {args.iters} round trips / 2")
    print(f"  {'config':<14} {'one-way us':>11} {'p90 us':>8} {'overhead us':>12} {'hook alone us':>14}")
    for name, topo in overhead_configs().items():
        rtts = ping_pong_loopback(topo, args.iters, args.payload)
        one_way, p90 = statistics.median(rtts) / 2, statistics.quantiles(rtts, n=10)[-1] / 2
        alone = hook_cost(topo, 20_000, sealed(args.payload)) if topo is not None else 0.0
        rows[name] = {"one_way_us": one_way * 1e6, "p90_us": p90 * 1e6, "hook_alone_us": alone * 1e6}
        base = rows["raw"]["one_way_us"]
        print(f"  {name:<14} {one_way * 1e6:11.1f} {p90 * 1e6:8.1f} {one_way * 1e6 - base:12.1f} {alone * 1e6:14.2f}")
    return rows


# ---------------------------------------------------------------------------------------------------
# wall: self-tests of wall mode (two-sided, host-dependent)

def sync_start(group: Group, lead_s: float = 0.05) -> float:
    """A start time every rank agrees on (sent unshaped from rank 0; perf_counter is host-wide)."""
    t = np.array([time.perf_counter() + lead_s]).view(np.int64) if group.rank == 0 else None
    return float(broadcast(group, t).view(np.float64)[0])


def sends_to_master(plans: dict[int, list[tuple[float, int]]]) -> Callable[[Group, object], dict]:
    """Each rank in `plans` sends (offset_s, payload bytes) messages to rank 0 from an agreed start; rank
    0 receives message i of every sender (in rank order) before message i + 1 of any. Returns, on rank 0,
    {"seen": {src: [t_seen, ...]}, "first_byte_ms": DelayStage.first_byte_ms() (0.0 in user space)}."""

    def fn(group: Group, hook) -> dict:
        group.link_hook = None
        t0 = sync_start(group)
        group.link_hook = hook
        if group.rank in plans:
            payload = np.zeros(max(n for _, n in plans[group.rank]), np.uint8)
            sent = []
            for offset, nbytes in plans[group.rank]:
                hook.clock.wait_until(t0 + offset)
                sent.append(time.perf_counter())
                group.channel(0).send_array(Kind.TENSOR, payload[:nbytes])
            return {"sent": sent}
        if group.rank:
            return {}
        seen: dict[int, list[float]] = {}
        for i in range(max(len(p) for p in plans.values())):
            for src in sorted(plans):
                if i < len(plans[src]):
                    group.channel(src).recv_array(Kind.TENSOR)
                    seen.setdefault(src, []).append(time.perf_counter())
        return {"seen": seen, "first_byte_ms": hook.first_byte_ms() if isinstance(hook, DelayStage) else 0.0}

    return fn


def timed_stats(net, n: int, plans: dict[int, list[tuple[float, int]]],
                spin: bool = True) -> tuple[list[tuple[int, float, float]], float]:
    """(src, t_sent, t_seen) of every message of `plans` (sender-major, each sender's in order), and how
    long after the send their first bytes reached rank 0 (ms, median; kernel backend only)."""
    clock = (lambda rank: WallClock()) if spin else None
    out = run_on_network(net, n, sends_to_master(plans), clock_factory=clock)
    rows = [(src, t_sent, t_seen) for src in sorted(plans)
            for t_sent, t_seen in zip(out[src]["sent"], out[0]["seen"][src], strict=True)]
    return rows, out[0]["first_byte_ms"]


def timed(net, n: int, plans: dict[int, list[tuple[float, int]]], spin: bool = True) -> list[tuple[int, float, float]]:
    return timed_stats(net, n, plans, spin)[0]


def part_wall(args: argparse.Namespace) -> dict:
    rows = {}
    print("\n# wall: user-space shaper on a wall clock, expected vs measured (host-dependent)")

    def row(name: str, expected: float, measured: float, ok: bool, tol: str) -> None:
        rows[name] = {"expected_ms": expected * 1e3, "measured_ms": measured * 1e3, "within": ok}
        print(f"  {name:<44} expected {expected * 1e3:9.3f} ms  measured {measured * 1e3:9.3f} ms  "
              f"{tol:<18} {'within' if ok else 'OUTSIDE'}")

    for latency_ms in (1, 5, 10):
        net = make_network("user", make_topology(_devices(2), "full", Link(latency_ms=latency_ms)))
        try:
            gap = latency_ms / 1e3 + 0.004
            res = timed(net, 2, {1: [(i * gap, 64) for i in range(21)]})
        finally:
            net.close()
        med = statistics.median(seen - sent for _, sent, seen in res)
        row(f"one-way, 64 B, {latency_ms} ms link (median)", latency_ms / 1e3, med,
            abs(med - latency_ms / 1e3) <= 3e-4, "0.3 ms")
    for mbps in (100, 300):
        net = make_network("user", make_topology(_devices(2), "full", Link(bandwidth_mbps=mbps)))
        expected = (sealed(MiB) - BURST_BYTES) * 8 / (mbps * 1e6)
        try:
            res = timed(net, 2, {1: [(i * (expected + 0.015), MiB) for i in range(3)]})
        finally:
            net.close()
        took = statistics.median(seen - sent for _, sent, seen in res)
        row(f"1 MiB at {mbps} Mbit/s (median)", expected, took, abs(took / expected - 1) <= 0.05, "5%")
    mbps = 100
    net = make_network("user", make_topology(_devices(3), "star", Link(latency_ms=0.5, bandwidth_mbps=mbps)))
    try:
        res = timed(net, 3, {1: [(0.0, MiB)], 2: [(0.0, MiB)]})
    finally:
        net.close()
    expected = (2 * sealed(MiB) - BURST_BYTES) * 8 / (mbps * 1e6) + 0.001
    last = max(seen for *_, seen in res) - min(sent for _, sent, _ in res)
    row("2 x 1 MiB into one 100 Mbit/s downlink", expected, last, abs(last / expected - 1) <= 0.05, "5%")
    return rows


# ---------------------------------------------------------------------------------------------------
# backends: the same patterns on both, and the model

def rtt_fn(group: Group, hook, iters: int = 100) -> list[float]:
    x = np.zeros(16, np.float32)
    ch = group.channel(1 - group.rank) if group.rank < 2 else None
    rtts = []
    for _ in range(iters if ch else 0):
        if group.rank == 0:
            t = time.perf_counter()
            ch.send_array(Kind.TENSOR, x)
            ch.recv_into(x)
            rtts.append(time.perf_counter() - t)
        else:
            ch.recv_into(x)
            ch.send_array(Kind.TENSOR, x)
    return rtts


def step_fn(layers: int, hidden: int, steps: int) -> Callable[[Group, object], list[float]]:
    """`steps` decode steps' traffic: 2 x layers star allreduces of `hidden` floats each."""

    def fn(group: Group, hook) -> list[float]:
        x = np.ones(hidden, np.float32)
        took = []
        for _ in range(steps + 1):  # the first warms up
            t = time.perf_counter()
            for _ in range(2 * layers):
                allreduce(group, x, "star")
                x[:] = 1.0
            took.append(time.perf_counter() - t)
        return took[1:]

    return fn


def model_step_s(topo: Topology, layers: int, hidden: int) -> float:
    """The same decode step on virtual clocks: the link model's exact time, no host in it."""
    n, frame = len(topo), sealed(4 * hidden)
    scripts: dict[int, list] = {r: [] for r in range(n)}
    for _ in range(2 * layers):
        for r in range(1, n):
            scripts[r].append(Send(0, frame))
            scripts[0].append(Recv(r))
        for r in range(1, n):
            scripts[0].append(Send(r, frame))
            scripts[r].append(Recv(0))
    return max(run_script(topo, scripts).ends.values())


def model_of(topo: Topology, scripts: dict[int, list]) -> list[float]:
    return run_script(topo, scripts).deliveries[0]


def part_backends(args: argparse.Namespace) -> dict:
    why = unavailable()
    kinds = ["user"] + (["kernel"] if why is None else [])
    print(f"\n# backends: star of {args.devices} devices, {args.latency_ms} ms links; user-space shaper vs kernel "
          f"backend (tbf + delay stage), wall clock, plain sleeps (the incast: a spun start), best of {args.rounds} "
          f"rounds (each a median); model = the same pattern on virtual clocks")
    if why:
        print(f"  kernel backend unavailable: {why}")
    print(f"  {'pattern':<34} {'model':>10} " + " ".join(f"{k:>10}" for k in kinds) + "   kernel/user")
    rows: dict = {}
    n = args.devices
    for mbps in args.rates:
        topo = make_topology(_devices(n), "star", Link(latency_ms=args.latency_ms, bandwidth_mbps=mbps))
        bulk = [(i * (sealed(MiB) * 8 / (mbps * 1e6) + 0.02), MiB) for i in range(BULK_REPS)]
        gap_s = (n - 1) * sealed(64 * 1024) * 8 / (mbps * 1e6) + 4 * args.latency_ms / 1e3 + 0.02
        incast = {r: [(i * gap_s, 64 * 1024) for i in range(INCAST_REPS)] for r in range(1, n)}
        model = {
            "rtt one-way ms": model_of(topo, {1: [Send(0, sealed(64))], 0: [Recv(1)]})[0],
            "bulk 1 MiB ms": model_of(topo, {1: [Send(0, sealed(MiB))], 0: [Recv(1)]})[0],
            f"incast {n - 1} x 64 KiB, last ms": max(model_of(topo, {r: [Send(0, sealed(64 * 1024))] for r in range(1, n)}
                                                             | {0: [Recv(r) for r in range(1, n)]})),
            f"step: {2 * args.layers} allreduces ms": model_step_s(topo, args.layers, args.hidden),
        }
        measured: dict[str, dict[str, float]] = {}
        entry_ms: list[float] = []  # kernel: the bulk frames' first bytes at device 0, after the send
        for _ in range(args.rounds):  # backends alternate; host noise only adds, so each keeps its best round
            for kind in kinds:
                net = make_network(kind, topo)
                try:
                    rtts = run_on_network(net, n, rtt_fn)[0]
                    b, first_byte_ms = timed_stats(net, n, {1: bulk}, spin=False)
                    c = timed(net, n, incast, spin=True)  # a spun start: the senders' wake-ups are not the link's
                    steps = run_on_network(net, n, step_fn(args.layers, args.hidden, args.steps))
                finally:
                    net.close()
                got = {
                    "rtt one-way ms": statistics.median(rtts) / 2,
                    "bulk 1 MiB ms": statistics.median(seen - sent for _, sent, seen in b),
                    f"incast {n - 1} x 64 KiB, last ms": statistics.median(
                        max(seen for *_, seen in c[i::INCAST_REPS]) - min(sent for _, sent, _ in c[i::INCAST_REPS])
                        for i in range(INCAST_REPS)),
                    f"step: {2 * args.layers} allreduces ms": statistics.median(max(r[i] for r in steps)
                                                                              for i in range(args.steps)),
                }
                best = measured.setdefault(kind, got)
                for name, x in got.items():
                    best[name] = min(best[name], x)
                if kind == "kernel":
                    entry_ms.append(first_byte_ms)
        print(f"  -- {mbps} Mbit/s")
        for name, m in model.items():
            vals = [measured[k][name] for k in kinds]
            ratio = f"{vals[1] / vals[0]:10.3f}" if len(vals) == 2 else ""
            print(f"  {name:<34} {m * 1e3:10.3f} " + " ".join(f"{v * 1e3:10.3f}" for v in vals) + f"   {ratio}")
            rows[f"{mbps} Mbit/s: {name}"] = {"model": m, **{k: measured[k][name] for k in kinds}}
        if entry_ms:
            entry, name = min(entry_ms), "bulk 1 MiB ms"
            print(f"  {'  kernel, from its first byte':<34} {model[name] * 1e3:10.3f} {'':>10} "
                  f"{measured['kernel'][name] * 1e3 - entry:10.3f}   "
                  f"{(measured['kernel'][name] * 1e3 - entry) / (measured['user'][name] * 1e3):10.3f}")
            print(f"  (the 1 MiB frame's first byte reached device 0 {entry:.2f} ms after the send: the sender seals "
                  f"the whole frame before any byte enters the kernel's link; the user-space shaper's link time "
                  f"starts at the send and overlaps it)")
            rows[f"{mbps} Mbit/s: bulk first byte after the send ms (kernel)"] = entry
    return rows


def part_experiment(args: argparse.Namespace) -> dict:
    why = unavailable()
    if why:
        print(f"\n# experiment: kernel backend unavailable: {why}")
        return {}
    n = args.experiment_devices
    print(f"\n# experiment: {args.model}, tensor parallel on {n} devices, star {args.latency_ms} ms links, wall clock; "
          f"per backend the best of {args.rounds} alternating rounds of the median over runs 2..{args.reps}")
    print(f"  {'rate':>8} {'metric':<18} {'user':>10} {'kernel':>10} {'kernel/user':>12}")
    rows = {}
    for mbps in args.rates:
        got: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for kind in ("user", "kernel"):
                doc = {"name": f"bench-shaper-{kind}",
                       "topology": {"devices": {"count": n, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                                    "links": {"shape": "star", "latency_ms": args.latency_ms, "bandwidth_mbps": mbps}},
                       "model": {"synth": args.model},
                       "workload": {"prompt_lengths": [16], "new_tokens": args.tokens, "repetitions": args.reps},
                       "options": {"clock": "wall", "shaper": kind}}
                out = Run(load_run_config(None, doc=doc), results_dir=args.scratch / "results",
                          cache_dir=args.scratch / "cache", progress=False).run()
                recs = [r for r in out.records if not r.error][1:]
                if out.exit_code or not recs:
                    raise SystemExit(f"experiment with shaper {kind} at {mbps} Mbit/s failed: {out.summary}")
                this = {"TTFT s": statistics.median(r.timings.ttft_s for r in recs),
                        "token latency s": statistics.median(r.timings.token_latency_s for r in recs)}
                best = got.setdefault(kind, this)
                for metric, x in this.items():
                    best[metric] = min(best[metric], x)
        for metric in got["user"]:
            u, k = got["user"][metric], got["kernel"][metric]
            print(f"  {mbps:>8.0f} {metric:<18} {u:10.4f} {k:10.4f} {k / u:12.3f}")
            rows[f"{mbps} Mbit/s: {metric}"] = {"user": u, "kernel": k}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "overhead", "wall", "backends", "experiment"), default="all")
    parser.add_argument("--iters", type=int, default=2000, help="overhead: round trips per configuration")
    parser.add_argument("--payload", type=int, default=64, help="overhead: payload bytes per message")
    parser.add_argument("--devices", type=int, default=4, help="backends: devices in the star")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[10.0, 300.0],
                        help="backends: link rates, Mbit/s (default 10,300)")
    parser.add_argument("--latency-ms", type=float, default=1.0, help="backends: latency of every link")
    parser.add_argument("--layers", type=int, default=22, help="backends: layers per decode step (TinyLlama: 22)")
    parser.add_argument("--hidden", type=int, default=2048, help="backends: hidden size (TinyLlama: 2048)")
    parser.add_argument("--steps", type=int, default=5, help="backends: decode steps timed")
    parser.add_argument("--rounds", type=int, default=2, help="backends: rounds (each backend keeps its best)")
    parser.add_argument("--model", default="tiny", help="experiment: synth preset (default %(default)s)")
    parser.add_argument("--experiment-devices", type=int, default=2,
                        help="experiment: devices (default 2: wall-clock devices need a core each)")
    parser.add_argument("--tokens", type=int, default=12, help="experiment: new tokens per run")
    parser.add_argument("--reps", type=int, default=3, help="experiment: runs per backend and rate")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/tpi-bench/shaper"),
                        help="experiment: where its results lines and model cache go")
    parser.add_argument("--out", type=Path, help="also write the numbers as one JSON object here")
    args = parser.parse_args(argv)

    out = {}
    for part, fn in (("overhead", part_overhead), ("wall", part_wall), ("backends", part_backends),
                     ("experiment", part_experiment)):
        if args.part in ("all", part):
            out[part] = fn(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bench": "shaper", "args": {k: str(v) for k, v in vars(args).items()},
                                        **out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
