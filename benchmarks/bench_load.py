"""Cold start: time to ready and to the first token, against what the first forward pass must read.

Target (engine issue): time to first token on a cold start must not grow with the checkpoint's size
beyond what the first forward pass reads: tensors are memory-mapped when opened, and nothing is read
or converted eagerly.

    .venv/bin/python benchmarks/bench_load.py --models small-100m small-100m-v4x small-100m-l4x tinyllama-1.1b

For each checkpoint, in a fresh process with the checkpoint's files dropped from the page cache
(fsync + posix_fadvise(DONTNEED), checked with mincore):
  ready       TensorStore.from_model_dir + check() + Device(...) (max_seq 2048): header parsing only
  TTFT cold   ready -> logits of an 8-token prompt (prefill), reading the weights from disk
              (median of --repeats fresh processes, the files dropped before each)
  TTFT warm   the same with the files left in the page cache (median of --repeats)
  read        bytes of the files in the page cache after the cold run (mincore): what was read,
              readahead included (a page fault reads up to read_ahead_kb around it: 8 MiB on this
              machine's disk, so each embedding row looked up costs up to 8 MiB)
  needed      bytes the first forward pass must read: every tensor but the embedding table, plus
              the prompt's rows of it
  disk GB/s   plain sequential read() of the same files, cold, in this run (best of 2): the rate the
              disk gives. The disk is shared and sits on a cache below this VM: a file not read
              for a while can come at 0.1-0.4 GB/s, so this also brings the files to the warm
              side of that cache before the cold runs
  pred        ready + warm compute + needed / disk rate: what TTFT cold should be if nothing but
              the needed bytes is read
The fair comparisons are within pairs that differ only in bytes the first pass does not need:
small-100m vs small-100m-v4x (4x vocabulary: the embedding table, read by rows only, grows 4x; the
LM head too, and that one is read), f32 vs bf16 (half the bytes, widened to f32 block by block on
first use), and small-100m-l4x (4x layers: all of it needed) as the control that must scale.
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
    MODELS,
    cached_bytes,
    dir_bytes,
    drop_from_page_cache,
    ensure_model,
    print_table,
    run_worker,
    safetensors_files,
)

PROMPT = 8


def rss_anon_bytes() -> int:
    """Anonymous (not file-backed) resident memory of this process: what was copied or converted."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(a: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    import numpy as np

    from tpicore.runtime.device import Device, ResidentSource
    from tpicore.weights.store import TensorStore

    t_import = time.perf_counter()
    anon0 = rss_anon_bytes()
    store = TensorStore.from_model_dir(a.model)
    store.check()
    dev = Device(store, ResidentSource(store), max_seq=2048)
    t_ready = time.perf_counter()
    ids = np.asarray([(7919 * i + 13) % (store.cfg.vocab_size - 300) + 3 for i in range(PROMPT)], dtype=np.int64)
    logits = dev.step(ids, 0)
    int(np.argmax(logits[-1]))
    t_first = time.perf_counter()
    embed = store.ckpt.info("model.embed_tokens.weight")
    tied = "lm_head.weight" not in store.ckpt
    row_bytes = embed.nbytes // embed.shape[0]
    needed = sum(i.nbytes for i in store.ckpt.tensors.values()) - (0 if tied else embed.nbytes - PROMPT * row_bytes)
    return {"import_s": t_import - t_start, "ready_s": t_ready - t_import, "ttft_s": t_first - t_ready,
            "needed_bytes": needed, "anon_bytes": rss_anon_bytes() - anon0}


def cold_read_rate(files: list[str], tries: int = 2) -> float:
    """GB/s of plain sequential read() of the files, cold, into one reused buffer (best of `tries`:
    the disk is shared, and a slow try says more about the neighbours than about the disk)."""
    buf = bytearray(16 << 20)
    best = 0.0
    for _ in range(tries):
        for f in files:
            drop_from_page_cache(f)
        n, t0 = 0, time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    n += k
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    for f in files:
        drop_from_page_cache(f)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small-100m", "small-100m-v4x", "small-100m-l4x", "tinyllama-1.1b"],
                   help=f"benchmark models ({', '.join(MODELS)}) or checkpoint folders")
    p.add_argument("--dtypes", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16", "f16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="cold (and warm) runs per checkpoint; medians")
    p.add_argument("--json", help="append one JSON row per checkpoint to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0

    rows = []
    for name in a.models:
        for dtype in a.dtypes:
            d = ensure_model(name, dtype) if name in MODELS else name
            files = safetensors_files(d)
            disk = cold_read_rate(files)  # also leaves the files out of the page cache
            before = sum(cached_bytes(f) for f in files)
            colds, warms, read = [], [], 0
            for r in range(a.repeats):  # the shared disk is noisy: medians over fresh processes
                if r:
                    for f in files:
                        drop_from_page_cache(f)
                colds.append(run_worker(__file__, ["--worker", "--model", d], a.threads))
                read = max(read, sum(cached_bytes(f) for f in files))
            for _ in range(a.repeats):
                warms.append(run_worker(__file__, ["--worker", "--model", d], a.threads))
            for f in files:
                drop_from_page_cache(f)
            cold = {k: statistics.median(c[k] for c in colds) for k in ("ready_s", "ttft_s", "anon_bytes", "import_s")}
            cold["needed_bytes"] = colds[0]["needed_bytes"]
            warm = {"ttft_s": statistics.median(w["ttft_s"] for w in warms)}
            needed = cold["needed_bytes"]
            pred = cold["ready_s"] + warm["ttft_s"] + needed / (disk * 1e9)
            row = {"model": os.path.basename(d.rstrip("/")), "ckpt_GB": dir_bytes(d) / 1e9,
                   "needed_GB": needed / 1e9, "cached_before_MB": before / 1e6, "read_GB": read / 1e9,
                   "excess_MB": (read - needed) / 1e6,
                   "ready_ms": 1e3 * cold["ready_s"], "ttft_cold_s": cold["ttft_s"], "ttft_warm_s": warm["ttft_s"],
                   "disk_GBps": disk, "pred_s": pred, "cold_over_pred": (cold["ready_s"] + cold["ttft_s"]) / pred,
                   "anon_GB": cold["anon_bytes"] / 1e9, "import_s": cold["import_s"], "threads": a.threads,
                   "ttft_cold_all_s": [c["ttft_s"] for c in colds]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")

    print_table(rows, [("model", "checkpoint"), ("ckpt_GB", "file GB"), ("needed_GB", "needed GB"),
                       ("read_GB", "read GB"), ("excess_MB", "read-needed MB"), ("cached_before_MB", "cached before MB"),
                       ("ready_ms", "ready ms"),
                       ("ttft_cold_s", "TTFT cold s"), ("ttft_warm_s", "TTFT warm s"), ("disk_GBps", "disk GB/s"),
                       ("pred_s", "pred s"), ("cold_over_pred", "(ready+cold)/pred"), ("anon_GB", "anon RSS GB")],
                title=f"Cold start ({a.threads} thread(s), prompt {PROMPT} tokens, medians of {a.repeats} processes; "
                      "TTFT counted from ready)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
