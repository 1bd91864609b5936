"""Calibrate the `measured` compute model against `roofline` on this host, per block kind.

This host's profile is measured in the same run with NumPy, one thread (the emulator's virtual clock runs
one BLAS thread per device): memory GB/s = np.dot(W, x) over 512 MB of float32 matrices (the GEMV probe
of benchmarks/common.py, what a decode step does), GFLOP/s = a 1024^3 float32 GEMM. Then the same blocks
run twice on one resident device: once on a `measured` virtual clock (thread CPU time), once on a
`roofline` clock with the host's profile (max(bytes / bandwidth, flops / peak) of tpicore.model.cost).
The table gives, per block kind (attn, ffn, post = LM head, pre = embedding), the mean virtual time of
each and their ratio, for a prefill of `--prompt` tokens and for decode steps.

    .venv/bin/python benchmarks/bench_roofline_calibration.py [--model small-100m] [--steps 8]

A ratio near 1 says the roofline is a fair stand-in for this host; above 1, the host spends time the
roofline does not see (Python, attention's small matrices, norms, RoPE, allocation). Weights in memory
(resident, warmed by one untimed step), so no disk is involved.
"""

from __future__ import annotations

import os

os.environ.update({v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import ensure_model, gemv_probe, print_table  # noqa: E402
from emulator.config.compute_model import Roofline  # noqa: E402
from emulator.net.clock import VirtualClock  # noqa: E402
from tpicore.runtime.device import Device, ResidentSource  # noqa: E402
from tpicore.weights.store import TensorStore  # noqa: E402


def host_bandwidth_gbytes_s(rounds: int = 5) -> float:
    run, nbytes = gemv_probe(2048, 2048)
    run()  # warm
    best = min(_timed(run) for _ in range(rounds))
    return nbytes / best / 1e9


def host_gflops(n: int = 1024, rounds: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(rounds))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class BlockClock(VirtualClock):
    """A virtual clock that also records each block's charge under its kind (the Device's _run order)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.kind = "pre"
        self.per_kind: dict[str, list[float]] = defaultdict(list)

    def end_compute(self) -> None:
        t = self.now()
        super().end_compute()
        self.per_kind[self.kind].append(self.now() - t)


def run_blocks(store: TensorStore, clock: BlockClock, prompt: list[int], steps: int) -> dict[str, dict[str, float]]:
    """Per phase (prefill, decode), per block kind: the mean charge of one block."""
    dev = Device(store, ResidentSource(store), len(prompt) + steps + 2, clock=clock)
    run = dev._run

    def tagged(block, fn, work=None):  # note the block kind for the clock, then run it as the Device does
        clock.kind = block[0]
        return run(block, fn, work) if work is not None else run(block, fn)

    dev._run = tagged  # type: ignore[method-assign]
    dev.step(np.asarray(prompt), 0)  # warm: first touch of every weight, caches
    out = {}
    for phase, ids, pos in (("prefill", prompt, 0), ("decode", None, len(prompt))):
        clock.per_kind.clear()
        if phase == "prefill":
            clock.kind = "pre"
            dev.step(np.asarray(ids), pos)
        else:
            for s in range(steps):
                clock.kind = "pre"
                dev.step(np.asarray([7]), pos + s)
        out[phase] = {k: float(np.mean(v)) for k, v in clock.per_kind.items()}
    dev.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-100m")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    bw, peak = host_bandwidth_gbytes_s(), host_gflops()
    print(f"host profile (1 thread, NumPy): memory {bw:.2f} GB/s (GEMV over 512 MB), peak {peak:.1f} GFLOP/s "
          f"(1024^3 GEMM)")
    store = TensorStore.from_model_dir(ensure_model(a.model))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, store.cfg.vocab_size, a.prompt)]
    measured = run_blocks(store, BlockClock(), prompt, a.steps)
    roof = run_blocks(store, BlockClock(model=Roofline(bw, peak)), prompt, a.steps)
    rows = []
    for phase in ("prefill", "decode"):
        for kind in ("pre", "attn", "ffn", "post"):
            m, r = measured[phase].get(kind, 0.0), roof[phase].get(kind, 0.0)
            rows.append({"phase": phase, "kind": kind, "measured": f"{m * 1e3:.3f}", "roofline": f"{r * 1e3:.3f}",
                         "ratio": f"{m / r:.2f}" if r > 0 else "-"})
    print_table(rows, [("phase", "phase"), ("kind", "block"), ("measured", "measured ms"),
                       ("roofline", "roofline ms"), ("ratio", "measured / roofline")],
                title=f"{a.model}: one block's virtual time, prompt {a.prompt} tokens, {a.steps} decode steps")


if __name__ == "__main__":
    main()
