"""Shaper overhead per message: the raw transport vs the same transport with the link hook.

Two processes ping-pong a small tensor over tpicore.comm (TCP loopback); one-way time = round trip / 2,
median over many round trips. Configurations, side by side:

    raw          no link hook
    ideal link   LinkShaper on a 0 ms, unlimited link (the fast path: no schedule, no lock)
    0 ms 10 Gb/s LinkShaper on a 0 ms, 10 Gbit/s link (the full path: lock + reservation per message)
    klonet 0 ms  4 hops of 0 ms, 10 Gbit/s links (reservation on every hop)

plus the hook's own cost measured in one process (on_send + on_recv, no sockets).

    python benchmarks/bench_shaper.py [--iters 2000] [--payload 64] [--out results/bench_shaper.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from emulator.net.clock import WallClock
from emulator.net.shaper import LinkSchedule, LinkShaper
from emulator.config.topology import Device, Link, Topology, make_topology
from tpicore.comm.transport import Group, run_local_processes
from tpicore.comm.wire import Kind


def _devices(n: int) -> list[Device]:
    return [Device(f"d{i}", cores=1, mem_bytes=2**30) for i in range(n)]


def configs() -> dict[str, Topology | None]:
    fast = Link(latency_ms=0, bandwidth_mbps=10_000)
    return {
        "raw": None,
        "ideal link": make_topology(_devices(2), "full", Link()),
        "0 ms 10 Gb/s": make_topology(_devices(2), "full", fast),
        "klonet 0 ms": make_topology(_devices(2), "klonet", fast),
    }


def ping_pong(topology: Topology | None, iters: int, payload: int) -> list[float]:
    """Round-trip seconds of `iters` ping-pongs between rank 0 and rank 1."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000, help="round trips per configuration")
    parser.add_argument("--payload", type=int, default=64, help="payload bytes per message")
    parser.add_argument("--out", type=Path, help="also write the numbers as one JSON object here")
    args = parser.parse_args(argv)

    rows = {}
    print(f"one-way time per message, {args.payload}-byte payload, median of {args.iters} round trips / 2")
    print(f"  {'config':<14} {'one-way us':>11} {'p90 us':>8} {'overhead us':>12} {'hook alone us':>14}")
    for name, topo in configs().items():
        rtts = ping_pong(topo, args.iters, args.payload)
        one_way = statistics.median(rtts) / 2
        p90 = statistics.quantiles(rtts, n=10)[-1] / 2
        alone = hook_cost(topo, 20_000, args.payload + 56) if topo is not None else 0.0
        rows[name] = {"one_way_us": one_way * 1e6, "p90_us": p90 * 1e6, "hook_alone_us": alone * 1e6}
        base = rows["raw"]["one_way_us"]
        print(f"  {name:<14} {one_way * 1e6:11.1f} {p90 * 1e6:8.1f} {one_way * 1e6 - base:12.1f} {alone * 1e6:14.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bench": "shaper", "payload": args.payload, "iters": args.iters,
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
