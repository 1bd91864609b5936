"""Decode latency of tensor parallelism on this host, side by side in one run, with the GEMV bound.

For each model (default: small-100m, the 125M model, and smollm2-135m-shape, 30 small layers) and each
setting (N = 1; N = 2 and 4 with `--ratios equal` (the default), `--ratios balanced`, and equal shares
with `--split-head`, the LM head sharded by vocabulary rows), rounds
interleave the settings so that background load hits all alike. Every setting decodes the same greedy
tokens after the same prompt, 1 BLAS thread per process, resident f32 weights, star allreduce with
sealed frames (as `tpi generate` runs). Per setting, the table gives:

  token ms       median wall time of one decode step (master: embed .. logits)
  compute/rank   each rank's compute ms per token (allreduce time excluded): the balance of the split
  comm ms        the master's communication ms per token (broadcast + allreduces, waits included)
  speedup        N = 1 token ms / this token ms
  x bound        token ms / the GEMV bound (N = 1 rows only)
  bound ms       the NumPy GEMV bound: one np.dot per weight matrix a decode step reads (every layer,
                 the LM head), back to back, in the driver process (1 thread), measured every round
  same           the greedy tokens equal the N = 1 tokens
  path MB        weight MB on the step's critical path: every block ends in an allreduce (a barrier), so a
                 step costs the sum over blocks of the slowest rank's bytes, plus the master's LM head
                 (its largest vocabulary slice with --split-head); model.split.step_bytes counts each
                 rank's total instead, which is what "balanced" equalises

    .venv/bin/python benchmarks/bench_tp_decode.py [--models small-100m smollm2-135m-shape]
        [--devices 1 2 4] [--tokens 24] [--rounds 3] [--placements equal balanced split-head]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cpu_pressure, ensure_model, print_table  # noqa: E402
from tpicore.comm.channel import spin_budget_s, usable_cores  # noqa: E402
from tpicore.dist.session import ParallelSession, plan_ratios
from tpicore.dist.tensor_parallel import set_blas_threads  # noqa: E402
from tpicore.model.config import ModelConfig  # noqa: E402
from tpicore.model.split import split_layouts  # noqa: E402
from tpicore.runtime.device import Device, ResidentSource  # noqa: E402
from tpicore.runtime.session import GenerateOptions  # noqa: E402
from tpicore.weights.store import TensorStore  # noqa: E402

PROMPT = list(range(3, 19))


def decode_loop(step: Callable, n_new: int, mark: Callable = lambda: None) -> tuple[list[int], list[float], object]:
    """Prefill PROMPT, then n_new greedy decode steps: (tokens, seconds per decode step, what `mark()`
    returned between the prefill and the first decode step)."""
    logits = step(np.asarray(PROMPT, dtype=np.int64), 0)
    tokens, times = [int(np.argmax(logits[-1]))], []
    marked = mark()
    for i in range(n_new):
        t0 = time.perf_counter()
        logits = step(np.asarray(tokens[-1:], dtype=np.int64), len(PROMPT) + i)
        times.append(time.perf_counter() - t0)
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, times, marked


def one_process(model_dir: str, n_new: int) -> dict:
    store = TensorStore.from_model_dir(model_dir)
    dev = Device(store, ResidentSource(store), len(PROMPT) + n_new + 1)
    decode_loop(dev.step, 2)  # weights resident, caches warm
    tokens, times, before = decode_loop(dev.step, n_new, dev.timers.snapshot)
    split = dev.timers.snapshot() - before
    return {"tokens": tokens, "token_s": times, "compute_s": [split.compute_s / n_new], "comm_s": split.comm_s / n_new}


def parallel(model_dir: str, n: int, placement: str, n_new: int) -> dict:
    opts = GenerateOptions(model=model_dir, devices=n, ratios="equal" if placement == "split-head" else placement,
                           split_head=placement == "split-head")
    with ParallelSession(opts) as s:
        s.prepare(max_seq=len(PROMPT) + n_new + 1)
        decode_loop(s.step, 2)
        tokens, times, before = decode_loop(s.step, n_new, s.master.collect)
        after = s.master.collect()
    splits = [a.since(b).time_split for a, b in zip(after, before)]
    return {"tokens": tokens, "token_s": times, "compute_s": [t.compute_s / n_new for t in splits],
            "comm_s": splits[0].comm_s / n_new}


def critical_path_mb(model_dir: str, n: int, placement: str) -> float:
    """Sum over blocks of the largest rank's f32 weight MB, plus the master's final norm and LM head."""
    cfg = ModelConfig.from_dir(model_dir)
    ratios = plan_ratios(GenerateOptions(model=model_dir, devices=n, ratios="balanced" if placement == "balanced"
                                         else "equal")) if n > 1 else [1.0]
    layouts = split_layouts(cfg, n, ratios)
    D, Dh = cfg.hidden_size, cfg.head_dim
    attn = max(D * Dh * 2 * (lay.n_heads + lay.n_kv_heads) + D for lay in layouts)
    ffn = max(3 * D * lay.n_ffn + D for lay in layouts)
    head_rows = -(-cfg.vocab_size // n) if placement == "split-head" else cfg.vocab_size
    return 4 * (cfg.num_hidden_layers * (attn + ffn) + head_rows * D + D) / 1e6


def gemv_bound(model_dir: str) -> Callable[[], float]:
    """One pass of np.dot over every weight matrix a decode step reads (as the engine holds them)."""
    store = TensorStore.from_model_dir(model_dir)
    dev = Device(store, ResidentSource(store), 4)
    dev.step(np.asarray([3], dtype=np.int64), 0)
    mats = [w for blk in dev.source.cache.values() for w in blk.values() if w.ndim == 2]
    xs = {c: np.ones(c, dtype=np.float32) for c in {m.shape[1] for m in mats}}

    def one_pass() -> float:
        t0 = time.perf_counter()
        for m in mats:
            np.dot(m, xs[m.shape[1]])
        return time.perf_counter() - t0

    one_pass()
    return one_pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small-100m", "smollm2-135m-shape"])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--placements", nargs="+", default=["equal", "balanced", "split-head"],
                    choices=["equal", "balanced", "split-head"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    set_blas_threads(1)  # the driver (N = 1 and the bound); workers get cpu_count // N (1 on a 2-core host)
    load0, pressure = os.getloadavg()[0], []
    rows = []
    for name in a.models:
        model_dir = ensure_model(name)
        settings = [(n, p) for n in a.devices for p in (["-"] if n == 1 else a.placements)]
        res: dict[tuple[int, str], list[dict]] = {s: [] for s in settings}
        bounds: list[float] = []
        bound = gemv_bound(model_dir)
        for _ in range(a.rounds):
            for n, p in settings:
                bounds.append(min(bound() for _ in range(3)))
                res[(n, p)].append(one_process(model_dir, a.tokens) if n == 1 else parallel(model_dir, n, p, a.tokens))
                set_blas_threads(1)  # a session sets the master's to cpu_count // N
                pressure.append(cpu_pressure())
        bound_ms = 1e3 * statistics.median(bounds)
        ref_tokens = res[settings[0]][0]["tokens"]
        base_ms = None
        for n, p in settings:
            runs = res[(n, p)]
            token_ms = 1e3 * statistics.median(t for r in runs for t in r["token_s"])
            per_rank = [1e3 * statistics.median(r["compute_s"][k] for r in runs) for k in range(n)]
            base_ms = base_ms or token_ms
            rows.append({"model": name, "setting": f"N={n}" + ("" if n == 1 else f" {p}"),
                         "token_ms": token_ms, "compute": " / ".join(f"{c:.1f}" for c in per_rank),
                         "comm_ms": 1e3 * statistics.median(r["comm_s"] for r in runs),
                         "speedup": base_ms / token_ms, "x_bound": token_ms / bound_ms if n == 1 else "",
                         "bound_ms": bound_ms, "same": all(r["tokens"] == ref_tokens for r in runs),
                         "path_mb": critical_path_mb(model_dir, n, p)})
    print_table(rows, [("model", "model"), ("setting", "setting"), ("token_ms", "token ms"),
                       ("compute", "compute ms per rank (0 / 1 / ..)"), ("comm_ms", "comm ms"),
                       ("speedup", "speedup"), ("x_bound", "x bound"), ("bound_ms", "bound ms"), ("path_mb", "path MB"),
                       ("same", "same")],
                f"decode ms/token, {a.tokens} tokens x {a.rounds} rounds (median), 1 BLAS thread per process, "
                f"star allreduce, sealed frames, receives poll up to "
                f"{' / '.join(f'{spin_budget_s(n) * 1e6:.0f}' for n in a.devices if n > 1)} us at N = "
                f"{' / '.join(str(n) for n in a.devices if n > 1)} ({usable_cores()} cores); "
                f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
                f"CPU pressure max {max(pressure):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
