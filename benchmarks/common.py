"""Shared helpers for the benchmarks: synthetic checkpoints, thread pinning, page-cache control, tables.

Owns what more than one benchmark needs: the benchmark models (tpicore.synth checkpoints, written once),
running a worker in a fresh process with a fixed BLAS/OpenMP thread count, the GEMV bandwidth probe,
dropping a checkpoint from the page cache (and checking that it is gone), and aligned tables. Must not
import torch or transformers at module level: the tpi workers must not pay for (or be perturbed by) them.

Thread counts are fixed by environment variables read when NumPy / torch load their BLAS, so every
measurement runs in a child process started with `thread_env` (`run_worker` for one-shot workers),
never in the process that sets them.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = "/tmp/tpi-bench"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# Synthetic models (written by tpicore.synth, the same files `tpi synth` makes)

# benchmark model name -> (synth preset, config overrides)
MODELS: dict[str, tuple[str, dict]] = {
    "small-100m": ("small-100m", {}),  # 125M parameters, 0.5 GB in f32
    "tinyllama-1.1b": ("tinyllama-1.1b", {}),  # 1.1B parameters, 4.4 GB in f32
    # small-100m with 4x the vocabulary: the embedding table (read by rows only) and the LM head grow
    "small-100m-v4x": ("small-100m", {"vocab_size": 128000}),
    # small-100m with 4x the layers: every added byte is read by the first forward pass
    "small-100m-l4x": ("small-100m", {"num_hidden_layers": 48}),
    # SmolLM2-135M's shape (random weights): 30 small layers, where per-step Python overhead shows
    "smollm2-135m-shape": ("small-100m", {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                                          "head_dim": 64, "intermediate_size": 1536, "num_hidden_layers": 30,
                                          "vocab_size": 49152, "tie_word_embeddings": True}),
}


def ensure_model(name: str, dtype: str = "f32", root: str = DEFAULT_ROOT) -> str:
    """The checkpoint folder of a benchmark model, written once and reused (delete `root` to rebuild)."""
    from tpicore.tools.synth.checkpoint import write_checkpoint
    from tpicore.tools.synth.presets import preset_config

    d = os.path.join(root, f"{name}-{dtype}")
    if not os.path.exists(os.path.join(d, "config.json")):
        preset, overrides = MODELS[name]
        config = {**preset_config(preset), **overrides}
        t0 = time.perf_counter()
        write_checkpoint(config, d, dtype=dtype, progress=False)
        print(f"# wrote {d} ({dir_bytes(d) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return d


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(p) for p in safetensors_files(d))


def safetensors_files(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------
# Processes and threads


def thread_env(threads: int) -> dict[str, str]:
    """The environment for a child whose NumPy (OpenBLAS) and torch (OpenMP/MKL) use `threads` threads."""
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS})
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(script: str, args: list[str], threads: int, timeout_s: float = 1800) -> dict:
    """Run `python script --worker ... args` with pinned thread counts; it prints one JSON line last."""
    cmd = [sys.executable, script, *args]
    p = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_pressure() -> float:
    """% of the last 10 s in which some runnable task waited for a CPU (/proc/pressure/cpu, "some avg10").

    Printed beside results: on this shared host, anything above a few % means neighbours were running.
    """
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def check_threads(threads: int) -> None:
    """In a worker: fail loudly if the environment does not pin the thread count we report."""
    for v in THREAD_VARS:
        if os.environ.get(v) != str(threads):
            raise RuntimeError(f"{v}={os.environ.get(v)!r}, expected {threads} (start workers via run_worker)")


# ---------------------------------------------------------------------------------------------
# Memory bandwidth


def gemv_probe(rows: int, cols: int, total_bytes: int = 512 << 20) -> tuple[Callable[[], None], int]:
    """(one pass, bytes per pass): np.dot(W, x) over anonymous (rows, cols) float32 matrices.

    The set is larger than any cache, so bytes / time of a pass is the rate at which a decode GEMV
    streams weights from DRAM here: the denominator of the bandwidth bound.
    """
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((rows, cols), dtype=np.float32)
            for _ in range(max(2, total_bytes // (rows * cols * 4)))]
    x = rng.standard_normal(cols, dtype=np.float32)

    def one_pass() -> None:
        for m in mats:
            np.dot(m, x)

    one_pass()  # page faults, thread pool start
    return one_pass, sum(m.nbytes for m in mats)


# ---------------------------------------------------------------------------------------------
# Page cache


def drop_from_page_cache(path: str) -> None:
    """Evict a file's clean pages (works only while no process maps them; see machine.md)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


def cached_bytes(path: str) -> int:
    """Bytes of `path` resident in the page cache now (mincore over a fresh read-only mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            arr = np.frombuffer(mm, dtype=np.uint8)  # read-only view: gives the mapping's address
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            rc = _libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec)
            del arr
            if rc != 0:
                raise OSError(ctypes.get_errno(), f"mincore({path})")
        finally:
            mm.close()
    return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) * page


# ---------------------------------------------------------------------------------------------
# Tables


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> None:
    """Aligned text table: columns are (key, header); floats get 3 significant digits."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    body = [[cell(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))
