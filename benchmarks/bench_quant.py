"""Quantized weights (issue 12), side by side in one run: f32 vs q8_0 vs q4_k.

A) One worker of the emulated Llama 2-70B split (8 devices, rank 1, w = 2, disk modelled at 2 GB/s, virtual
   clock: the device's own CPU time), streaming its share of every layer through the window. The quantized
   types run twice: kept quantized in the slabs (the default: the compute thread's fused dequantize+GEMV,
   so dequantization is inside "compute") and `--dequantize-at-load` (the loader dequantizes each block
   into float32 slabs: "dequant" on the loader's timeline). Per token: s/token of the device (links
   excluded: they are the emulator's, see results/quantized.jsonl), the loader's disk time and
   dequantization CPU, the compute, which of them sets the pace, bytes read per token against
   the quantized block bytes of its shard (manifest), and peak RSS. The share is written by `tpi synth
   --devices 8 --unique-layers 1` for rank 1 only; `--layers L` runs L of the 80 layers and scales the
   per-token numbers by 80 / L (every layer of a worker is the same work).
B) One device, resident, on a real-layout GGUF file (`tpi synth PRESET --format gguf`): decode ms/token with
   the weights kept quantized (fused dequantize+GEMV kernels, the default) and dequantized at load
   (`--dequantize-at-load`), against the f32 file; peak RSS in each mode. With `--llama-cpp DIR`, llama.cpp
   on the same files beside them: DIR holds its CPU library as a cffi module (`_llama_cpp_cpu*.so`, e.g. the
   `llama/` folder of the llama-cpp-cffi wheel from PyPI, unpacked), 1 thread, memory-mapped as it loads by
   default; `--llama-cpp-preload SO` is put in LD_PRELOAD for it (that wheel is built with GCC 14: on a
   GCC 12 libstdc++, preload a one-line `__cxa_call_terminate` shim).

Every measurement runs in a fresh child process with one BLAS thread (benchmarks/common.run_worker).

    python benchmarks/bench_quant.py [--layers 8] [--resident-model small-100m] [--tokens 3] [--llama-cpp DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import DEFAULT_ROOT, print_table, run_worker  # noqa: E402
from emulator.net.clock import VirtualClock  # noqa: E402
from tpicore.runtime.device import Device, ResidentSource  # noqa: E402
from tpicore.runtime.env import DeviceEnv, DiskModel  # noqa: E402
from tpicore.runtime.memory import peak_rss_bytes  # noqa: E402
from tpicore.runtime.window import WindowSource  # noqa: E402
from tpicore.tools.synth.gguf import write_synthetic_gguf  # noqa: E402
from tpicore.tools.synth.presets import preset_config  # noqa: E402
from tpicore.tools.synth.unique import write_unique_shards  # noqa: E402
from tpicore.weights.manifest import read_manifest  # noqa: E402
from tpicore.weights.store import TensorStore  # noqa: E402

DTYPES = ("f32", "q8_0", "q4_k")
DISK_MBPS = 16000.0  # 2 GB/s
FULL_LAYERS = 80


def worker_window(a: argparse.Namespace) -> dict:
    store = TensorStore.from_shard_dir(a.shard)
    man = read_manifest(a.shard)
    per_layer = sum(t.nbytes for n, t in man.tensors.items() if n.startswith("model.layers.0."))
    clock = VirtualClock(1.0)
    src = WindowSource(store, 2, env=DeviceEnv(clock=clock, disk=DiskModel(read_mbps=DISK_MBPS)), drop_cache=False,
                       dequantize_at_load=a.at_load)
    dev = Device(store, src, 16, clock=clock)
    x = np.random.default_rng(0).standard_normal((1, store.cfg.hidden_size)).astype(np.float32)
    dev.layers(x, 0)  # first token: slabs settle (and the kernels compile or load from numba's cache)
    t0, s0, dq0 = clock.now(), dev.timers.snapshot(), src.reader.dequant_cpu_s
    for pos in range(1, 1 + a.tokens):
        dev.layers(x, pos)
    n = a.tokens
    s1 = dev.timers.snapshot()
    out = {"s_per_token": (clock.now() - t0) / n, "compute_s": (s1.compute_s - s0.compute_s) / n,
           "stall_s": (s1.stall_s - s0.stall_s) / n, "load_s": (s1.load_s - s0.load_s) / n,
           "dequant_cpu_s": (src.reader.dequant_cpu_s - dq0) / n, "bytes_per_token": (s1.loaded_bytes - s0.loaded_bytes) / n,
           "block_bytes_per_token": per_layer * store.cfg.num_hidden_layers, "peak_rss_bytes": peak_rss_bytes()}
    dev.close()
    return out


def worker_resident(a: argparse.Namespace) -> dict:
    store = TensorStore.from_model_dir(a.gguf)
    dev = Device(store, ResidentSource(store, a.at_load), 64)
    ids = np.array([1, 2, 3, 4], dtype=np.int64)
    dev.step(ids, 0)  # prefill; first use loads every block
    times = []
    for pos in range(4, 4 + a.tokens):
        t0 = time.perf_counter()
        dev.step(ids[:1], pos)
        times.append(time.perf_counter() - t0)
    dev.close()
    return {"ms_per_token": 1e3 * sorted(times)[len(times) // 2], "peak_rss_bytes": peak_rss_bytes()}


def worker_llama_cpp(a: argparse.Namespace) -> dict:
    """llama.cpp's decode on the same GGUF through its C API: prompt [1, 2, 3, 4], then one token a step."""
    sys.path.insert(0, a.llama_cpp)
    mod = importlib.import_module("_llama_cpp_cpu")  # llama-cpp-cffi's prebuilt CPU library
    ffi, lib = mod.ffi, mod.lib
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(a.gguf.encode(), lib.llama_model_default_params())
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 64, 16, 16, 1, 1
    ctx = lib.llama_init_from_model(model, cp)
    if model == ffi.NULL or ctx == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {a.gguf}")
    prompt, tok = ffi.new("llama_token[]", [1, 2, 3, 4]), ffi.new("llama_token[]", [5])
    lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, 4))
    times = []
    for i in range(a.tokens):
        t0 = time.perf_counter()
        if lib.llama_decode(ctx, lib.llama_batch_get_one(tok, 1)) != 0:
            raise RuntimeError("llama_decode failed")
        lib.llama_get_logits_ith(ctx, -1)
        times.append(time.perf_counter() - t0)
        tok[0] = 5 + i
    return {"ms_per_token": 1e3 * sorted(times)[len(times) // 2], "peak_rss_bytes": peak_rss_bytes()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="layers of the 70B shape run (scaled to 80)")
    p.add_argument("--tokens", type=int, default=2, help="decode tokens measured (after one warm-up token)")
    p.add_argument("--resident-model", default="small-100m", help="synth preset of the resident GGUF (B)")
    p.add_argument("--root", default=os.path.join(DEFAULT_ROOT, "quant"))
    p.add_argument("--skip-window", action="store_true")
    p.add_argument("--llama-cpp", metavar="DIR", help="folder of llama.cpp's cffi module _llama_cpp_cpu (B)")
    p.add_argument("--llama-cpp-preload", metavar="SO", help="LD_PRELOAD for the llama.cpp runs")
    p.add_argument("--worker", choices=("window", "resident", "llama_cpp"), help=argparse.SUPPRESS)
    p.add_argument("--shard", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--at-load", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        work = {"window": worker_window, "resident": worker_resident, "llama_cpp": worker_llama_cpp}[a.worker]
        print(json.dumps(work(a)))
        return 0

    os.makedirs(a.root, exist_ok=True)
    script = os.path.abspath(__file__)
    if not a.skip_window:
        scale = FULL_LAYERS / a.layers
        rows = []
        for dt in DTYPES:
            out = os.path.join(a.root, f"l2-70b-{a.layers}L-{dt}")
            if not os.path.isfile(os.path.join(out, "rank-1", "manifest.json")):
                write_unique_shards(dict(preset_config("llama-2-70b"), num_hidden_layers=a.layers), out, 8, 1, dt,
                                    ranks=[1], force=os.path.exists(out))
            for mode, at_load in ([("", False)] if dt == "f32" else [("kept", False), ("at load", True)]):
                r = run_worker(script, ["--worker", "window", "--shard", os.path.join(out, "rank-1"),
                                        "--tokens", str(a.tokens)] + (["--at-load"] if at_load else []), threads=1)
                disk_s = r["bytes_per_token"] / (DISK_MBPS * 1e6 / 8)
                parts = {"disk": disk_s, "dequantization": r["dequant_cpu_s"], "compute": r["compute_s"]}
                loader = disk_s + r["dequant_cpu_s"]
                rows.append({"dtype": dt, "mode": mode, "s_token": scale * r["s_per_token"], "disk": scale * disk_s,
                             "dequant": scale * r["dequant_cpu_s"], "compute": scale * r["compute_s"],
                             "stall": scale * r["stall_s"], "read_vs_blocks": r["bytes_per_token"] / r["block_bytes_per_token"],
                             "peak_gib": r["peak_rss_bytes"] / 2**30,
                             "pace": max(parts, key=parts.get) if loader < r["compute_s"] else
                             ("disk" if disk_s >= r["dequant_cpu_s"] else "dequantization")})
        print_table(rows, [("dtype", "dtype"), ("mode", "mode"), ("s_token", "s/token"), ("disk", "disk s"), ("dequant", "dequant s"),
                           ("compute", "compute s"), ("stall", "stall s"), ("read_vs_blocks", "read/blocks"),
                           ("peak_gib", "peak GiB"), ("pace", "sets the pace")],
                    f"A) Llama 2-70B, worker rank 1 of 8, w = 2, 2 GB/s disk, virtual clock; {a.layers} of 80 layers "
                    f"run, per-token numbers x{scale:g}; links excluded (the emulator's: results/quantized.jsonl)")
    rows = []
    config = preset_config(a.resident_model)
    for dt in DTYPES:
        path = os.path.join(a.root, f"{a.resident_model}-{dt}.gguf")
        if not os.path.isfile(path):
            write_synthetic_gguf(dict(config), path, dt)
        modes = [("resident", False)] if dt == "f32" else [("kept quantized", False), ("dequantize-at-load", True)]
        for mode, at_load in modes:
            r = run_worker(script, ["--worker", "resident", "--gguf", path, "--tokens", str(a.tokens + 3)]
                           + (["--at-load"] if at_load else []), threads=1)
            rows.append({"dtype": dt, "mode": mode, "ms": r["ms_per_token"], "file_mb": os.path.getsize(path) / 1e6,
                         "peak_mib": r["peak_rss_bytes"] / 2**20})
        if a.llama_cpp:
            if a.llama_cpp_preload:
                os.environ["LD_PRELOAD"] = a.llama_cpp_preload  # inherited by the worker only
            r = run_worker(script, ["--worker", "llama_cpp", "--gguf", path, "--tokens", str(a.tokens + 13),
                                    "--llama-cpp", a.llama_cpp], threads=1)
            os.environ.pop("LD_PRELOAD", None)
            rows.append({"dtype": dt, "mode": "llama.cpp (mmap)", "ms": r["ms_per_token"],
                         "file_mb": os.path.getsize(path) / 1e6, "peak_mib": r["peak_rss_bytes"] / 2**20})
    print_table(rows, [("dtype", "dtype"), ("mode", "mode"), ("ms", "decode ms/token"), ("file_mb", "file MB"),
                       ("peak_mib", "peak RSS MiB")],
                f"B) one device, resident, {a.resident_model}-shaped GGUF, 1 BLAS thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
