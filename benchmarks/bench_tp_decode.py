"""Decode latency of tensor parallelism on this host: N = 2 vs N = 1, side by side, one run.

Prints per-token latency (median) and the per-token split into compute and communication on the
master, for the same synthetic ~100M-parameter model (small-100m, f32). On a 2-core host N = 2 means
one core per device, so the comparison is fair only against N = 1 with one BLAS thread; the N = 1 row
with two threads shows what one process gets from the whole machine.

    .venv/bin/python benchmarks/bench_tp_decode.py [--tokens 24] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ensure_model, print_table  # noqa: E402


def one_process(model_dir: str, prompt: list[int], n_new: int, threads: int) -> dict:
    from tpicore.dist.tensor_parallel import set_blas_threads
    from tpicore.runtime.device import Device, ResidentSource
    from tpicore.runtime.generate import generate
    from tpicore.weights.store import TensorStore

    set_blas_threads(threads)
    st = TensorStore.from_model_dir(model_dir)
    dev = Device(st, ResidentSource(st), len(prompt) + n_new)
    generate(dev.step, prompt, 2, max_seq=len(prompt) + n_new)  # warm the page cache / weights
    dev = Device(st, ResidentSource(st), len(prompt) + n_new)
    per_token = []
    last = dev.timers.snapshot()

    def step(ids, pos, all_logits=False):
        nonlocal last
        out = dev.step(ids, pos, all_logits)
        now = dev.timers.snapshot()
        per_token.append({k: now[k] - last[k] for k in now})
        last = now
        return out

    gen = generate(step, prompt, n_new, max_seq=len(prompt) + n_new)
    return {"setting": f"N=1, {threads} BLAS thread(s)", "gen": gen, "per_token": per_token[1:]}


def tensor_parallel(model_dir: str, prompt: list[int], n_new: int, n: int, algo: str) -> dict:
    from tpicore.dist.tensor_parallel import run_local

    run_local(n, prompt, 2, model=model_dir, allreduce=algo)  # shard once + warm up
    gen, report = run_local(n, prompt, n_new, model=model_dir, allreduce=algo)
    return {"setting": f"N={n} ({algo}), 1 thread each", "gen": gen, "per_token": report["per_token"][1:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: synthetic small-100m f32)")
    ap.add_argument("--tokens", type=int, default=24)
    a = ap.parse_args(argv)
    model_dir = a.model or ensure_model("small-100m")
    prompt = list(range(1, 17))
    rows, ref = [], None
    for res in [one_process(model_dir, prompt, a.tokens, 1), one_process(model_dir, prompt, a.tokens, 2),
                tensor_parallel(model_dir, prompt, a.tokens, 2, "star")]:
        gen, pt = res["gen"], res["per_token"]
        ref = ref or gen.tokens
        rows.append({
            "setting": res["setting"],
            "token_ms": 1e3 * statistics.median(gen.token_latencies_s),
            "compute_ms": 1e3 * statistics.median(t["compute_s"] for t in pt),
            "comm_ms": 1e3 * statistics.median(t["comm_s"] for t in pt),
            "ttft_ms": 1e3 * gen.ttft_s,
            "same_tokens": gen.tokens == ref,
        })
    base = rows[0]["token_ms"]
    for r in rows:
        r["speedup_vs_N1_1t"] = base / r["token_ms"]
    print_table(rows, [("setting", "setting"), ("token_ms", "token ms (median)"), ("compute_ms", "compute ms"),
                       ("comm_ms", "comm ms"), ("ttft_ms", "TTFT ms"), ("speedup_vs_N1_1t", "speedup"),
                       ("same_tokens", "same tokens")],
                f"decode latency, {os.path.basename(model_dir)}, {a.tokens} tokens, prompt {len(prompt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
