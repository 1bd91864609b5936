"""Allreduce latency over TCP loopback, one forked process per rank, plain and sealed frames side by side.

Each rank calls allreduce back to back; rank 0 times every call (its call spans a whole round: it cannot
finish before every worker's contribution has arrived). For each (payload, N) row and each algorithm the
table gives the median and p99 microseconds per call with plain frames ("star med"), with sealed frames
("star+aead med": ChaCha20-Poly1305, tpicore.comm.seal), with receives that block at once or that first
poll for up to channel.SPIN_S ("+spin": what `Collective` does where the group has no more ranks than
the host has cores and the host's load average is under cores + 1; otherwise "+spin" rows block at
once like the others), and tables of the differences of the medians: the encryption's cost and the
spin's gain per allreduce. All columns come from the same run, alternating the variants' groups so
that background load hits them alike.

    .venv/bin/python benchmarks/bench_allreduce.py [--worlds 2 4 8] [--sizes 4 3072 16384 65536 262144]
        [--algos star ring tree] [--iters 300] [--encryption both|on|off] [--spin both|on|off]

3072 B is a decode step's hidden state on the 125M model (D = 768 floats): the issue's target is a star
allreduce of it at N = 2 under 100 us median with sealed frames.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from tpicore.comm.channel import DEFAULT_TIMEOUT_S, spin_budget_s
from tpicore.comm.collectives import ALGOS, allreduce, set_spin
from tpicore.comm.group import Group
from tpicore.comm.local import run_local_processes

MODES = {"both": (False, True), "on": (True,), "off": (False,)}


def _measure(group: Group, sizes: list[int], algos: list[str], iters: int, warmup: int, spin: bool) -> dict:
    """Seconds per call at this rank, per (payload bytes, algorithm)."""
    set_spin(group, spin_budget_s(group.world_size) if spin else 0.0)
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
    ap.add_argument("--spin", choices=sorted(MODES), default="both",
                    help="receives that poll before blocking (on), block at once (off), or both side by side")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the variants' groups this many times")
    args = ap.parse_args(argv)

    variants = [(sealed, spin) for sealed in MODES[args.encryption] for spin in MODES[args.spin]]
    load0 = os.getloadavg()[0]
    samples: dict[tuple[int, int, str, bool, bool], list[float]] = {}
    for n in args.worlds:
        for _ in range(args.rounds):
            for sealed, spin in variants:
                res = run_local_processes(
                    n, lambda g: _measure(g, args.sizes, args.algos, args.iters, args.warmup, spin),
                    encrypt=sealed, timeout_s=DEFAULT_TIMEOUT_S, wait_s=1200.0)
                for (nbytes, algo), s in res[0].items():
                    samples.setdefault((nbytes, n, algo, sealed, spin), []).extend(s)

    def stat(key: tuple[int, int, str, bool, bool], q: float) -> float:
        return float(np.percentile(samples[key], q)) * 1e6

    def name(algo: str, sealed: bool, spin: bool) -> str:
        return algo + ("+aead" if sealed else "") + ("+spin" if spin else "")

    cols = [(a, m, sp, q) for m, sp in variants for a in args.algos for q in (50, 99)]
    head = f"{'payload':>8} {'N':>3} " + " ".join(
        f"{name(a, m, sp) + (' med' if q == 50 else ' p99'):>20}" for a, m, sp, q in cols)
    print(f"allreduce latency at rank 0, microseconds ({args.iters} x {args.rounds} calls per cell, TCP loopback, "
          f"one process per rank); +aead: frames sealed with ChaCha20-Poly1305; +spin: receives poll up to "
          f"{' / '.join(f'{spin_budget_s(n) * 1e6:.0f}' for n in args.worlds)} us at N = "
          f"{' / '.join(map(str, args.worlds))} ({len(os.sched_getaffinity(0))} cores) before blocking; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(head)
    print("-" * len(head))
    for nbytes in args.sizes:
        for n in args.worlds:
            cells = " ".join(f"{stat((nbytes, n, a, m, sp), q):>20.0f}" for a, m, sp, q in cols)
            print(f"{_fmt_size(nbytes):>8} {n:>3} {cells}")

    def diff_table(title: str, label: str, pairs: list[tuple[tuple[bool, bool], tuple[bool, bool]]]) -> None:
        head = f"{'payload':>8} {'N':>3} " + " ".join(
            f"{name(a, *hi) + ' ' + label:>20}" for a in args.algos for hi, _ in pairs)
        print(f"\n{title}, microseconds")
        print(head)
        print("-" * len(head))
        for nbytes in args.sizes:
            for n in args.worlds:
                cells = " ".join(f"{stat((nbytes, n, a, *hi), 50) - stat((nbytes, n, a, *lo), 50):>20.0f}"
                                 for a in args.algos for hi, lo in pairs)
                print(f"{_fmt_size(nbytes):>8} {n:>3} {cells}")

    spins, seals = MODES[args.spin], MODES[args.encryption]
    if len(seals) == 2:
        diff_table("encryption's cost per allreduce: +aead median - plain median", "cost",
                   [((True, sp), (False, sp)) for sp in spins])
    if len(spins) == 2:
        diff_table("spin's gain per allreduce: +spin median - blocking median (negative: faster)", "gain",
                   [((m, True), (m, False)) for m in seals])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
