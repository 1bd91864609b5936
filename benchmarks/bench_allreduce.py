"""Allreduce latency over TCP loopback, one forked process per rank, plain and sealed frames side by side.

Each rank calls allreduce back to back; rank 0 times every call (its call spans a whole round: it cannot
finish before every worker's contribution has arrived). For each (payload, N) row and each algorithm the
table gives the median and p99 microseconds per call with plain frames ("star med"), with sealed frames
("star+aead med": ChaCha20-Poly1305, tpicore.comm.seal), and a second table the difference of the medians:
the encryption's cost per allreduce. Both columns come from the
same run, alternating plain and sealed groups so that background load hits both alike.

    .venv/bin/python benchmarks/bench_allreduce.py [--worlds 2 4 8] [--sizes 4 3072 16384 65536 262144]
        [--algos star ring tree] [--iters 300] [--encryption both|on|off]

3072 B is a decode step's hidden state on the 125M model (D = 768 floats): the issue's target is a star
allreduce of it at N = 2 under 100 us median with sealed frames.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.collectives import ALGOS, allreduce
from tpicore.comm.group import Group
from tpicore.comm.local import run_local_processes

MODES = {"both": (False, True), "on": (True,), "off": (False,)}


def _measure(group: Group, sizes: list[int], algos: list[str], iters: int, warmup: int) -> dict:
    """Seconds per call at this rank, per (payload bytes, algorithm)."""
    times: dict[tuple[int, str], list[float]] = {}
    rng = np.random.default_rng(group.rank)
    for nbytes in sizes:
        x = rng.standard_normal(max(nbytes // 4, 1)).astype(np.float32)  # [D] with D = nbytes / 4
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
    return f"{nbytes // 1024} KiB" if nbytes >= 1024 and nbytes % 1024 == 0 else f"{nbytes} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 3072, 16 << 10, 64 << 10, 256 << 10],
                    help="payload bytes (float32: D = bytes / 4)")
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--encryption", choices=sorted(MODES), default="both",
                    help="sealed frames (on), plain frames (off), or both side by side")
    ap.add_argument("--rounds", type=int, default=2, help="alternate plain/sealed groups this many times")
    args = ap.parse_args(argv)

    modes = MODES[args.encryption]
    load0 = os.getloadavg()[0]
    samples: dict[tuple[int, int, str, bool], list[float]] = {}
    for n in args.worlds:
        for _ in range(args.rounds):
            for sealed in modes:
                res = run_local_processes(n, lambda g: _measure(g, args.sizes, args.algos, args.iters, args.warmup),
                                          encrypt=sealed, timeout_s=DEFAULT_TIMEOUT_S, wait_s=1200.0)
                for (nbytes, algo), s in res[0].items():
                    samples.setdefault((nbytes, n, algo, sealed), []).extend(s)

    def stat(key: tuple[int, int, str, bool], q: float) -> float:
        return float(np.percentile(samples[key], q)) * 1e6

    suffix = {False: "", True: "+aead"}
    cols = [(a, m, q) for m in modes for a in args.algos for q in (50, 99)]
    head = f"{'payload':>8} {'N':>3} " + " ".join(
        f"{a + suffix[m] + (' med' if q == 50 else ' p99'):>15}" for a, m, q in cols)
    print(f"allreduce latency at rank 0, microseconds ({args.iters} x {args.rounds} calls per cell, TCP loopback, "
          f"one process per rank); +aead: frames sealed with ChaCha20-Poly1305; load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(head)
    print("-" * len(head))
    for nbytes in args.sizes:
        for n in args.worlds:
            cells = " ".join(f"{stat((nbytes, n, a, m), q):>15.0f}" for a, m, q in cols)
            print(f"{_fmt_size(nbytes):>8} {n:>3} {cells}")
    if len(modes) == 2:
        head = f"{'payload':>8} {'N':>3} " + " ".join(f"{a + '-cost med':>15}" for a in args.algos)
        print("\nencryption's cost per allreduce: +aead median - plain median, microseconds")
        print(head)
        print("-" * len(head))
        for nbytes in args.sizes:
            for n in args.worlds:
                cells = " ".join(f"{stat((nbytes, n, a, True), 50) - stat((nbytes, n, a, False), 50):>15.0f}"
                                 for a in args.algos)
                print(f"{_fmt_size(nbytes):>8} {n:>3} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
