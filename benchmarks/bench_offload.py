"""One device, weights on disk: tpi's sliding window vs HF Accelerate's disk offload (torch CPU).

Target (scheduler issue): at least 5x lower token latency than Accelerate with disk offload, for the same
model and the same memory budget. The paper's Table 3 has Accelerate at 26 s/token for Llama 2-7B on one
laptop, its single-device sliding window (Transformers+MS) at 8 s/token.

    .venv/bin/python benchmarks/bench_offload.py [--model small-100m] [--dtype f32] [--threads 1] [--cache cold]

Both engines load the same synthetic checkpoint (benchmarks.common), prefill the same prompt and decode
greedily; decode token latency is the median over --new - 1 steps, each engine in its own process with the
same thread count, alternating over --rounds.
  tpi        --window 2: one Attn + one FFN block resident, read past the page cache by the loader thread
  Accelerate from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...): what does
             not fit the budget stays on disk and is read by a hook before each module runs (blocking)
Memory budget: the float32 bytes of tpi's window (one Attn + one FFN block) is the `cpu` budget given to
Accelerate for weights, so both hold the same weights in memory; peak RSS of both is printed (torch
itself costs ~200 MiB more than NumPy).
--cache cold (default) drops the checkpoint and the offload folder from the page cache before every
decode step in both engines: a device whose memory is the budget cannot keep a model that does not fit
in its page cache either. --cache warm leaves the page cache alone (tpi: drop_cache=False).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    DEFAULT_ROOT,
    check_threads,
    drop_from_page_cache,
    ensure_model,
    print_table,
    run_worker,
    safetensors_files,
)

MiB = 1 << 20
# Our own copies of the benchmark models: a cold page cache cannot be had for files that another
# benchmark keeps memory-mapped (fadvise ignores mapped pages).
ROOT = os.path.join(DEFAULT_ROOT, "scheduler")


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % (vocab - 300) + 3 for i in range(n)]


def drop_all(paths: list[str]) -> None:
    for p in paths:
        try:
            drop_from_page_cache(p)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Workers


def worker_tpi(a: argparse.Namespace) -> None:
    import numpy as np

    from tpicore.runtime.device import Device
    from tpicore.runtime.memory import memory_report, page_cache_bytes
    from tpicore.runtime.window import WindowSource
    from tpicore.weights.store import TensorStore

    check_threads(a.threads)
    store = TensorStore.from_model_dir(a.model_dir)
    files = safetensors_files(a.model_dir)
    cold = a.cache == "cold"
    drop_all(files)
    source = WindowSource(store, window=2, drop_cache=cold)
    dev = Device(store, source, a.prompt + a.new)
    source.attach(dev.timers)
    ids = prompt_ids(a.prompt, store.cfg.vocab_size)
    t0 = time.perf_counter()
    logits = dev.step(np.asarray(ids), 0)
    ttft = time.perf_counter() - t0
    tok, lat = int(np.argmax(logits[-1])), []
    tokens = [tok]
    for i in range(a.new - 1):
        if cold:
            drop_all(files)
        t0 = time.perf_counter()
        logits = dev.step(np.asarray([tok]), a.prompt + i)
        tok = int(np.argmax(logits[-1]))
        lat.append(time.perf_counter() - t0)
        tokens.append(tok)
    rep = memory_report(files)
    dev.close()
    print(json.dumps({"tokens": tokens, "ttft_s": ttft, "latencies_s": lat, **rep,
                      "page_cache_bytes": page_cache_bytes(files), "window_bytes": dev.timers.window.slab_bytes,
                      "stall_s": dev.timers.stall_s}))


def worker_accelerate(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tpicore.runtime.memory import memory_report

    check_threads(a.threads)
    torch.set_num_threads(a.threads)
    files = safetensors_files(a.model_dir)
    cold = a.cache == "cold"
    with tempfile.TemporaryDirectory(dir=a.root) as off:
        model = AutoModelForCausalLM.from_pretrained(
            a.model_dir, dtype=torch.float32, device_map="auto", max_memory={"cpu": int(a.budget)},
            offload_folder=off).eval()
        placement = sorted(set(getattr(model, "hf_device_map", {}).values()))

        def offloaded() -> list[str]:
            return files + [os.path.join(off, f) for f in os.listdir(off)]

        drop_all(offloaded())
        ids = torch.tensor([prompt_ids(a.prompt, model.config.vocab_size)])
        lat = []
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            ttft = time.perf_counter() - t0
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [int(tok)]
            for _ in range(a.new - 1):
                if cold:
                    drop_all(offloaded())
                t0 = time.perf_counter()
                out = model(tok, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                lat.append(time.perf_counter() - t0)
                tokens.append(int(tok))
        rep = memory_report(offloaded())
    print(json.dumps({"tokens": tokens, "ttft_s": ttft, "latencies_s": lat, "placement": placement, **rep}))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-100m", help="a benchmarks.common model")
    p.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="checkpoint dtype (default f32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", choices=("cold", "warm"), default="cold")
    p.add_argument("--prompt", type=int, default=4)
    p.add_argument("--new", type=int, default=6, help="tokens per run (1 prefill + decodes)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each engine, alternating")
    p.add_argument("--root", default=ROOT)
    p.add_argument("--json", help="append one JSON row to this file")
    p.add_argument("--worker", choices=["tpi", "accelerate"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "tpi":
        worker_tpi(a)
        return 0
    if a.worker == "accelerate":
        worker_accelerate(a)
        return 0

    from tpicore.model.config import ModelConfig
    from tpicore.model.split import split_layouts
    from tpicore.tools.predictor import device_blocks

    model_dir = ensure_model(a.model, a.dtype, a.root)
    cfg = ModelConfig.from_dir(model_dir)
    blk = device_blocks(cfg, split_layouts(cfg, 1)[0])
    budget = 4 * (blk.attn + blk.ffn)  # tpi's window at w = 2, float32
    common = ["--model-dir", model_dir, "--threads", str(a.threads), "--cache", a.cache, "--prompt", str(a.prompt),
              "--new", str(a.new), "--root", a.root]
    runs: dict[str, list[dict]] = {"tpi": [], "accelerate": []}
    for _ in range(a.rounds):
        runs["tpi"].append(run_worker(__file__, ["--worker", "tpi", *common], a.threads))
        runs["accelerate"].append(run_worker(__file__, ["--worker", "accelerate", "--budget", str(budget), *common],
                                             a.threads))
    rows = []
    for name, rs in runs.items():
        lat = statistics.median(x for r in rs for x in r["latencies_s"])
        rows.append({"engine": name, "s_per_token": lat, "ttft_s": statistics.median(r["ttft_s"] for r in rs),
                     "peak_rss_mib": max(r["peak_rss_bytes"] for r in rs) / MiB,
                     "page_cache_mib": max(r.get("page_cache_bytes", 0) for r in rs) / MiB,
                     "where": ",".join(rs[0].get("placement", [])) or "window 2"})
    same = runs["tpi"][0]["tokens"] == runs["accelerate"][0]["tokens"]
    speedup = rows[1]["s_per_token"] / rows[0]["s_per_token"]
    print_table(rows, [("engine", "engine"), ("s_per_token", "s/token"), ("ttft_s", "TTFT s"),
                       ("peak_rss_mib", "peak RSS MiB"), ("page_cache_mib", "page cache MiB"), ("where", "weights")],
                f"{a.model} ({a.dtype}), one device, {a.threads} thread(s), {a.cache} page cache, weight budget "
                f"{budget / MiB:.0f} MiB")
    print(f"tpi is {speedup:.2f}x faster per token than Accelerate disk offload (target >= 5x); "
          f"same greedy tokens: {same}")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"bench": "offload", "model": a.model, "dtype": a.dtype, "threads": a.threads,
                                "cache": a.cache, "budget_bytes": budget, "speedup": speedup, "same_tokens": same,
                                "rows": rows, "raw": runs}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
