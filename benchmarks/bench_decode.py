"""Decode latency: tpi (NumPy, fp32) vs HF Transformers (torch CPU, fp32, SDPA) vs the bandwidth bound.

Targets (engine issue): tpi at least 1.5x faster than Transformers per decoded token, and within 1.3x
of the memory-bandwidth bound = weight bytes read per token / np.dot GEMV bandwidth measured in the
same run. Both engines decode greedily from the same synthetic checkpoint and prompt, with the same
thread count (OPENBLAS/OMP/MKL_NUM_THREADS, and torch.set_num_threads), each in its own process.

    .venv/bin/python benchmarks/bench_decode.py --models small-100m tinyllama-1.1b --threads 1 2

The host is shared and noisy, so the two engines run in lockstep: both processes load and prefill,
then each round times, one after the other, a tpi decode step, a "GEMV-only" pass, a bandwidth
sample, and an HF decode step, with a pause before each so that the other side's BLAS/OpenMP threads
stop spinning, and each run twice with the second timed (the first pays for waking threads after the
pause). Slow phases of the host then hit every column alike; the table gives the medians over rounds
of each time and of each per-round ratio.

  bound       weight bytes one decode step reads (all layers, final norm, LM head; one embedding row
              is negligible) / GB/s of np.dot(W, x) over 512 MB of anonymous (F, D) float32 matrices
  CPU wait %  the highest /proc/pressure/cpu "some avg10" seen during the rounds: neighbours' load
              (a few % is quiet; tens of % means the numbers, 2-thread ones most, are disturbed)
  GEMV-only   the engine's own weight arrays (memory maps, as it holds them), one np.dot each, back to
              back with nothing else: tpi minus GEMV-only is all the rest (Python, attention, norms,
              RoPE, allocation)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    MODELS,
    check_threads,
    cpu_pressure,
    ensure_model,
    gemv_probe,
    print_table,
    thread_env,
)

PAUSE_S = 0.3  # > OpenBLAS's and libgomp's spin-wait before their idle threads sleep


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % (vocab - 300) + 3 for i in range(n)]  # clear of special tokens at both ends


# ---------------------------------------------------------------------------------------------
# Workers: each loads, prefills and warms up, prints "ready", then serves one command per stdin line
# ("step", "gemv", "bw", "done") with one JSON line on stdout.


def serve(commands: dict, result: dict) -> None:
    """Answer each command line by running it twice and reporting the second run's seconds: the
    first, after the driver's pause, pays for waking this process's BLAS threads (a cost that
    back-to-back decode steps in a real generation loop do not have)."""
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "done":
            print(json.dumps(result), flush=True)
            return
        commands[cmd]()
        t0 = time.perf_counter()
        commands[cmd]()
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


def worker_tpi(a: argparse.Namespace) -> None:
    import numpy as np

    from tpicore.runtime.device import Device, ResidentSource
    from tpicore.weights.store import TensorStore

    store = TensorStore.from_model_dir(a.model)
    store.check()
    dev = Device(store, ResidentSource(store), max_seq=a.prompt + a.warmup + 2 * a.rounds + 1)
    logits = dev.step(np.asarray(prompt_ids(a.prompt, store.cfg.vocab_size), dtype=np.int64), 0)
    tokens, pos = [int(np.argmax(logits[-1]))], [a.prompt]

    def step() -> None:
        logits = dev.step(np.asarray(tokens[-1:], dtype=np.int64), pos[0])
        tokens.append(int(np.argmax(logits[-1])))
        pos[0] += 1

    for _ in range(a.warmup):
        step()

    weights = [w for blk in dev.source.cache.values() for w in blk.values()]
    mats = [w for w in weights if w.ndim == 2]
    xs = {n: np.ones(n, dtype=np.float32) for n in {m.shape[1] for m in mats}}

    def gemv_only() -> None:
        for m in mats:
            np.dot(m, xs[m.shape[1]])

    bandwidth, probe_bytes = gemv_probe(store.cfg.intermediate_size, store.cfg.hidden_size)

    gemv_only()
    serve({"step": step, "gemv": gemv_only, "bw": bandwidth},
          {"tokens": tokens, "weight_bytes": sum(w.nbytes for w in weights),
           "probe_bytes": probe_bytes})


def worker_hf(a: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    torch.set_grad_enabled(False)
    out = model(input_ids=torch.tensor([prompt_ids(a.prompt, model.config.vocab_size)]), use_cache=True)
    state = {"past": out.past_key_values}
    tokens = [int(out.logits[0, -1].argmax())]

    def step() -> None:
        with torch.inference_mode():
            o = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=state["past"], use_cache=True)
        state["past"] = o.past_key_values
        tokens.append(int(o.logits[0, -1].argmax()))

    for _ in range(a.warmup):
        step()
    serve({"step": step}, {"tokens": tokens, "torch_threads": torch.get_num_threads()})


class Worker:
    """A worker process driven line by line."""

    def __init__(self, engine: str, a: argparse.Namespace, model_dir: str, threads: int) -> None:
        args = ["--worker", engine, "--model", model_dir, "--prompt", str(a.prompt), "--warmup", str(a.warmup),
                "--rounds", str(a.rounds)]
        self.p = subprocess.Popen([sys.executable, __file__, *args], env=thread_env(threads), text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.engine = engine

    def read(self) -> str:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker exited ({self.p.wait()}); see its stderr above")
        return line.strip()

    def wait_ready(self) -> None:
        if self.read() != "ready":
            raise RuntimeError(f"{self.engine} worker: expected 'ready'")

    def call(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return json.loads(self.read())

    def finish(self) -> dict:
        out = self.call("done")
        self.p.wait(timeout=60)
        return out


def run_setting(a: argparse.Namespace, model_dir: str, threads: int) -> dict:
    tpi = Worker("tpi", a, model_dir, threads)
    tpi.wait_ready()  # load one after the other: loading is not what is measured
    hf = Worker("hf", a, model_dir, threads)
    hf.wait_ready()
    t: dict[str, list[float]] = {"tpi": [], "gemv": [], "bw": [], "hf": []}
    pressure = []
    try:
        for _ in range(a.rounds):
            pressure.append(cpu_pressure())
            for key, w, cmd in (("tpi", tpi, "step"), ("gemv", tpi, "gemv"), ("bw", tpi, "bw"), ("hf", hf, "step")):
                time.sleep(PAUSE_S)
                t[key].append(w.call(cmd)["s"])
        rt, rh = tpi.finish(), hf.finish()
    finally:
        for w in (tpi, hf):
            if w.p.poll() is None:
                w.p.kill()
    wbytes = rt["weight_bytes"]
    bound = [wbytes * b / rt["probe_bytes"] for b in t["bw"]]  # per round: bytes / (probe bytes / probe s)
    med = statistics.median
    same = sum(x == y for x, y in zip(rt["tokens"], rh["tokens"]))
    return {"model": os.path.basename(model_dir.rstrip("/")), "threads": threads,
            "torch_threads": rh["torch_threads"], "rounds": a.rounds, "weights_MB": wbytes / 1e6,
            "gemv_GBps": rt["probe_bytes"] / med(t["bw"]) / 1e9, "bound_ms": 1e3 * med(bound),
            "gemv_only_ms": 1e3 * med(t["gemv"]), "tpi_ms": 1e3 * med(t["tpi"]), "hf_ms": 1e3 * med(t["hf"]),
            "hf_over_tpi": med(h / p for h, p in zip(t["hf"], t["tpi"])),
            "tpi_over_bound": med(p / b for p, b in zip(t["tpi"], bound)),
            "hf_over_bound": med(h / b for h, b in zip(t["hf"], bound)),
            "greedy_agree": f"{same}/{len(rt['tokens'])}", "cpu_pressure": max(pressure)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small-100m", "tinyllama-1.1b"],
                   help=f"benchmark models ({', '.join(MODELS)}) or checkpoint folders")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens before decoding")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before timing")
    p.add_argument("--rounds", type=int, default=16, help="timed decode steps (lockstep rounds)")
    p.add_argument("--json", help="append one JSON row per setting to this file")
    p.add_argument("--worker", choices=["tpi", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        a.threads = int(os.environ["OPENBLAS_NUM_THREADS"])
        check_threads(a.threads)
        (worker_tpi if a.worker == "tpi" else worker_hf)(a)
        return 0

    rows = []
    for name in a.models:
        model_dir = ensure_model(name) if name in MODELS else name
        for threads in a.threads:
            row = run_setting(a, model_dir, threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")

    print_table(rows, [("model", "model"), ("threads", "thr"), ("weights_MB", "MB/token"),
                       ("gemv_GBps", "GEMV GB/s"), ("bound_ms", "bound ms"), ("gemv_only_ms", "GEMV-only ms"),
                       ("tpi_ms", "tpi ms"), ("hf_ms", "HF ms"), ("hf_over_tpi", "HF/tpi (>=1.5)"),
                       ("tpi_over_bound", "tpi/bound (<=1.3)"), ("hf_over_bound", "HF/bound"),
                       ("greedy_agree", "same tokens"), ("cpu_pressure", "max CPU wait %")],
                title=f"Decode latency per token: medians over {a.rounds} lockstep rounds, prompt {a.prompt} "
                      f"tokens (ratios: medians of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
