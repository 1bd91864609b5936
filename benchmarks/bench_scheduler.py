"""The sliding-window scheduler: peak memory of 70B-shaped devices, and how well loading hides.

Targets (scheduler issue):
  memory   Llama 2-70B shape on 8 devices at window 2: under 1.0 GiB peak RSS on every device; Llama
           3.1-70B shape: under 1.5 GiB. Printed beside the paper's Table 2/6 (its measured peaks, N = 8)
           and the formulas (the paper's, and ours from tpicore.planner).
  overlap  on a model whose per-block compute + allreduce covers its load time, token latency at window 2
           within 1.15x of all-resident weights; the stall share per token; where loading does not hide,
           the steady condition that failed.

    .venv/bin/python benchmarks/bench_scheduler.py memory [--models llama-2-70b llama-3.1-70b] [--windows 2 4]
    .venv/bin/python benchmarks/bench_scheduler.py overlap [--model small-100m] [--allreduce-ms 0 8]

memory: the 70B shapes come from `tpi synth ARCH --devices 8 --unique-layers K` folders (tpicore.tools.synth.unique):
every one of the 80 logical layers is read from disk per token (the window drops the page cache behind
it), only K distinct layers take disk space. Each device runs alone in a fresh process (so the peak is
its own), on its own shard, for one prefill of --prompt tokens plus --new - 1 decode steps; workers get
the hidden states a master would broadcast, and the allreduce is the identity (the sum of N partials is
what a device receives; its memory is one [T, D] row block either way). The devices of one run are
alike apart from the master (rank 0: embedding rows, streamed LM head), so --ranks 0 1 measures both
kinds; --ranks all runs every rank. Peak RSS is VmHWM; page cache is mincore over the shard file after
the run (reported apart: the paper's peak is RSS).

overlap: one device (tpi's own engine, the same model resident or windowed, same thread count). Each
allreduce is emulated as a sleep of --allreduce-ms (what a device waits for the network: the paper
measured t_ar = 14 ms on Wi-Fi laptops), time in which the loader reads. Decode token latency is the
median over --new - 1 decode steps; the page cache is dropped before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    DEFAULT_ROOT,
    check_threads,
    drop_from_page_cache,
    ensure_model,
    print_table,
    run_worker,
)

MiB = 1 << 20
# Our own copies of the benchmark models: a cold page cache cannot be had for files that another
# benchmark keeps memory-mapped (fadvise ignores mapped pages).
ROOT = os.path.join(DEFAULT_ROOT, "scheduler")
# The paper's Table 2 (window 2) and Table 6 (window 4): peak memory per device with the scheduler, N = 8,
# in GB as printed (arXiv 2410.00531 v1; /work/shared/paper_tables.yaml). Without it: 34.9 and 42.3 GB.
PAPER_PEAK_GB_N8 = {("llama-2-70b", 2): 3.1, ("llama-2-70b", 4): 3.1,
                    ("llama-3.1-70b", 2): 11.3, ("llama-3.1-70b", 4): 11.4}
TARGET_GIB = {"llama-2-70b": 1.0, "llama-3.1-70b": 1.5}


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % (vocab - 300) + 3 for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Workers (run in a fresh process by run_worker; print one JSON line last)


def worker_memory(a: argparse.Namespace) -> None:
    import numpy as np

    from tpicore.runtime.device import Device
    from tpicore.runtime.memory import memory_report
    from tpicore.runtime.window import WindowSource
    from tpicore.weights.store import TensorStore

    check_threads(a.threads)
    store = TensorStore.from_shard_dir(a.shard)
    store.check()
    files = sorted({i.path for i in store.ckpt.tensors.values()})
    for f in files:
        drop_from_page_cache(f)
    source = WindowSource(store, window=a.window)
    dev = Device(store, source, a.prompt + a.new)
    source.attach(dev.timers)
    ids = prompt_ids(a.prompt, store.cfg.vocab_size)
    steps = []
    rng = np.random.default_rng(0)
    for i in range(a.new):
        t0 = time.perf_counter()
        T, pos = (a.prompt, 0) if i == 0 else (1, a.prompt + i - 1)
        if store.layout.rank == 0:
            dev.step(np.asarray(ids[:T] if i == 0 else ids[:1]), pos)
        else:  # what the master broadcasts: hidden states [T, D]
            dev.layers(rng.standard_normal((T, store.cfg.hidden_size), dtype=np.float32), pos)
        steps.append(time.perf_counter() - t0)
    report = memory_report(files)
    dev.close()
    t, w = dev.timers, dev.timers.window.to_json()
    print(json.dumps({**report, "step_s": steps, "timers": t.snapshot().to_json(), "slab_bytes": w.get("slab_bytes"),
                      "steady": w.get("steady"), "first_stall": w.get("first_stall")}))


def worker_overlap(a: argparse.Namespace) -> None:
    from tpicore.runtime.device import Device, ResidentSource
    from tpicore.runtime.generate import generate
    from tpicore.runtime.window import WindowSource
    from tpicore.weights.store import TensorStore

    check_threads(a.threads)
    store = TensorStore.from_model_dir(a.model_dir)
    files = sorted({i.path for i in store.ckpt.tensors.values()})
    for f in files:
        drop_from_page_cache(f)
    delay = a.allreduce_ms / 1e3

    def allreduce(x):  # the network's share of a tensor-parallel step: the device waits, the CPU is free
        if delay:
            time.sleep(delay)
        return x

    source = WindowSource(store, window=a.window) if a.window else ResidentSource(store)
    dev = Device(store, source, a.prompt + a.new, allreduce)
    if a.window:
        source.attach(dev.timers)
    gen = generate(dev.step, prompt_ids(a.prompt, store.cfg.vocab_size), a.new, max_seq=a.prompt + a.new)
    dev.close()
    w = dev.timers.window.to_json() if dev.timers.window is not None else {}
    print(json.dumps({"tokens": gen.tokens, "ttft_s": gen.ttft_s, "latencies_s": gen.token_latencies_s,
                      "steps": w.get("steps", []), "steady": w.get("steady"), "blocks": w.get("blocks"),
                      "timers": dev.timers.snapshot().to_json()}))


# ---------------------------------------------------------------------------------------------
# memory


def ensure_unique_shards(model: str, devices: int, unique_layers: int, dtype: str, ranks: list[int], root: str) -> str:
    from tpicore.tools.synth.presets import preset_config
    from tpicore.tools.synth.unique import write_unique_shards

    out = os.path.join(root, f"{model}-n{devices}-k{unique_layers}-{dtype}")
    missing = [r for r in ranks if not os.path.exists(os.path.join(out, f"rank-{r}", "manifest.json"))]
    if missing:
        t0 = time.perf_counter()
        want = sorted(set(ranks) | {int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("rank-")}
                      if os.path.isdir(out) else ranks)
        write_unique_shards(preset_config(model), out, devices, unique_layers, dtype, 0, ranks=want, force=True)
        print(f"# wrote {out} (ranks {want}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def run_memory(a: argparse.Namespace) -> list[dict]:
    from tpicore.model.config import ModelConfig
    from tpicore.tools.predictor import predict
    from tpicore.tools.synth.presets import preset_config

    rows = []
    for model in a.models:
        ranks = list(range(a.devices)) if a.ranks == ["all"] else [int(r) for r in a.ranks]
        out = ensure_unique_shards(model, a.devices, a.unique_layers, a.dtype, ranks, a.root)
        cfg = ModelConfig.from_dict(preset_config(model))
        for window in a.windows:
            preds = predict(cfg, a.devices, window, stored_bytes=2 if a.dtype != "f32" else 4,
                            max_seq=a.prompt + a.new, prompt_tokens=1)
            for rank in ranks:
                res = run_worker(__file__, ["--worker", "memory", "--shard", os.path.join(out, f"rank-{rank}"),
                                            "--window", str(window), "--prompt", str(a.prompt), "--new", str(a.new),
                                            "--threads", str(a.threads)], a.threads)
                t = res["timers"]
                read_s = sum(res["step_s"])
                row = {"model": model, "rank": rank, "w": window, "peak_mib": res["peak_rss_bytes"] / MiB,
                       "cache_mib": res["page_cache_bytes"] / MiB, "ours_mib": preds[rank].ours_bytes / MiB,
                       "paper_formula_mib": preds[rank].paper_bytes / MiB,
                       "paper_table_gb": PAPER_PEAK_GB_N8.get((model, window), float("nan")),
                       "target_gib": TARGET_GIB.get(model, float("nan")),
                       "ok": "yes" if res["peak_rss_bytes"] < TARGET_GIB.get(model, 1e9) * 2**30 else "NO",
                       "read_gb": t["loaded_bytes"] / 1e9, "disk_gbps": t["loaded_bytes"] / 1e9 / max(t["load_s"], 1e-9),
                       "step_s": statistics.median(res["step_s"]), "stall_share": t["stall_s"] / max(read_s, 1e-9)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps({"bench": "scheduler-memory", "devices": a.devices, "dtype": a.dtype,
                                            "unique_layers": a.unique_layers, **row, "raw": res}) + "\n")
    print_table(rows, [("model", "model"), ("rank", "rank"), ("w", "w"), ("peak_mib", "peak RSS MiB"),
                       ("cache_mib", "page cache MiB"), ("ours_mib", "ours pred. MiB"),
                       ("paper_formula_mib", "paper formula MiB"), ("paper_table_gb", "paper Table 2/6 GB"),
                       ("target_gib", "target GiB"), ("ok", "under"), ("read_gb", "read GB (run)"),
                       ("disk_gbps", "disk GB/s"), ("step_s", "s/step"), ("stall_share", "stall share")],
                f"Peak memory per device, {a.devices} devices, {a.dtype} on disk, {a.unique_layers} unique layers "
                f"(paper: measured RSS of its PyTorch runtime; formula: parameters x 4 B)")
    return rows


# ---------------------------------------------------------------------------------------------
# overlap


def run_overlap(a: argparse.Namespace) -> list[dict]:
    model_dir = ensure_model(a.model, a.dtype, a.root)
    rows = []
    for ms in a.allreduce_ms:
        runs = {window: run_worker(__file__, ["--worker", "overlap", "--model-dir", model_dir, "--window", str(window),
                                              "--allreduce-ms", str(ms), "--prompt", str(a.prompt), "--new", str(a.new),
                                              "--threads", str(a.threads)], a.threads)
                for window in [0, *a.windows]}
        res = runs[0]
        r_lat = statistics.median(res["latencies_s"])
        for window in a.windows:
            win = runs[window]
            assert res["tokens"] == win["tokens"], "the window changed the output"
            w_lat = statistics.median(win["latencies_s"])
            decode = win["steps"][1:]
            steady = win["steady"] or {}
            row = {"allreduce_ms": ms, "w": window, "resident_s": r_lat, "window_s": w_lat, "ratio": w_lat / r_lat,
                   "target": "<= 1.15" if window == 2 else "-",
                   "stall_share": statistics.median(s["stall_share"] for s in decode) if decode else 0.0,
                   "tight": steady.get("tight"), "loose": steady.get("loose"),
                   "failed": "; ".join(steady.get("failed", [])) or "-"}
            rows.append(row)
            print(json.dumps({**row, "stall_share_per_token": [round(s["stall_share"], 3) for s in decode],
                              "blocks_ms": win["blocks"]}), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"bench": "scheduler-overlap", "model": a.model, "dtype": a.dtype,
                                        "threads": a.threads, **row, "window_raw": win, "resident_raw": res}) + "\n")
    print_table(rows, [("allreduce_ms", "allreduce ms"), ("w", "w"), ("resident_s", "resident s/token"),
                       ("window_s", "window s/token"), ("ratio", "ratio"), ("target", "target"),
                       ("stall_share", "stall share/token"), ("tight", "tight"), ("loose", "loose"),
                       ("failed", "condition that failed (measured per-block averages)")],
                f"Overlap: {a.model} ({a.dtype} on disk), one device, {a.threads} BLAS thread(s), "
                f"allreduce emulated as a wait")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=("memory", "overlap", "all"), default="all")
    p.add_argument("--models", nargs="+", default=["llama-2-70b", "llama-3.1-70b"])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--windows", nargs="+", type=int, default=[2, 4], help="windows to measure")
    p.add_argument("--ranks", nargs="+", default=["0", "1"], help="ranks to measure, or 'all'")
    p.add_argument("--unique-layers", type=int, default=2)
    p.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="bf16", help="stored weight dtype")
    p.add_argument("--model", default="small-100m", help="overlap: a benchmarks.common model")
    p.add_argument("--allreduce-ms", nargs="+", type=float, default=[0.0, 14.0, 20.0],
                   help="overlap: emulated allreduce times (the paper measured 14 ms)")
    p.add_argument("--prompt", type=int, default=4)
    p.add_argument("--new", type=int, default=None, help="steps (1 prefill + decodes); default 2 / 10")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=ROOT, help="where benchmark models are written")
    p.add_argument("--json", help="append one JSON row per measurement to this file")
    p.add_argument("--worker", choices=["memory", "overlap"], help=argparse.SUPPRESS)
    p.add_argument("--shard", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, default=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "memory":
        worker_memory(a)
        return 0
    if a.worker == "overlap":
        a.allreduce_ms = a.allreduce_ms[0]
        worker_overlap(a)
        return 0
    new = a.new
    if a.what in ("memory", "all"):
        a.new = new or 2
        run_memory(a)
    if a.what in ("overlap", "all"):
        a.new = new or 10
        run_overlap(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
