"""Allreduce latency over TCP loopback, one forked process per rank: median and p99 per call, in microseconds.

Each rank calls allreduce back to back; rank 0 times every call (its call spans a whole round: it cannot
finish before every worker's contribution has arrived). Prints one row per (payload, N) with the
algorithms side by side.

    .venv/bin/python benchmarks/bench_allreduce.py [--worlds 2 4 8] [--sizes 4 16384 65536] [--iters 400]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tpicore.comm.collectives import ALGOS, allreduce
from tpicore.comm.transport import Group, run_local_processes


def _measure(group: Group, sizes: list[int], algos: list[str], iters: int, warmup: int) -> dict:
    times: dict[tuple[int, str], list[float]] = {}
    rng = np.random.default_rng(group.rank)
    for nbytes in sizes:
        x = rng.standard_normal(max(nbytes // 4, 1)).astype(np.float32)
        for algo in algos:
            buf = x.copy()
            samples = []
            for i in range(warmup + iters):
                np.copyto(buf, x)
                t0 = time.perf_counter()
                allreduce(group, buf, algo)
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
            times[(nbytes, algo)] = samples
    return times


def _fmt_size(nbytes: int) -> str:
    return f"{nbytes // 1024} KiB" if nbytes >= 1024 else f"{nbytes} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16 << 10, 64 << 10], help="payload bytes")
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)

    rows = {}
    for n in args.worlds:
        res = run_local_processes(n, lambda g: _measure(g, args.sizes, args.algos, args.iters, args.warmup),
                                  timeout_s=30.0, wait_s=600.0)
        for key, samples in res[0].items():
            us = np.asarray(samples) * 1e6
            rows[(key[0], n, key[1])] = (float(np.median(us)), float(np.percentile(us, 99)))

    head = f"{'payload':>8} {'N':>3} " + " ".join(f"{a + ' med':>10} {a + ' p99':>10}" for a in args.algos)
    print(f"allreduce latency at rank 0, microseconds ({args.iters} calls each, TCP loopback, processes)")
    print(head)
    print("-" * len(head))
    for nbytes in args.sizes:
        for n in args.worlds:
            cells = " ".join(f"{rows[(nbytes, n, a)][0]:>10.0f} {rows[(nbytes, n, a)][1]:>10.0f}" for a in args.algos)
            print(f"{_fmt_size(nbytes):>8} {n:>3} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
