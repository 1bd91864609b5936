"""Failover (issue 15): time from losing a worker to the next token, split as tpicore.dist.elastic records it,
beside the TTFT of the same prompt on the same group. Real local processes, no emulator.

For each N and each way of losing rank 2 (SIGKILL: the master sees EOF at once; SIGSTOP: it is found by
the timeout), one `tpi generate`-style session (tpicore.dist.session.ParallelSession, failover on, every
worker started with the model folder as its own copy, slices re-sharded from it on local disk):

    1. generate the prompt twice with N devices; TTFT = the second run's (warm)
    2. generate it again; right after decode token k rank 2 is killed / stopped; the next step recovers:
       detect (until the error), re-plan (probe + split), load (every survivor's new slice from its own
       copy, the master's own), rebuild (the prompt + tokens so far replayed on N - 1 devices)

Two ways the survivors get their slices, each a row:
    cold      nothing prepared: every survivor (and the master) re-shards its own model copy into its cache
    on disk   the N - 1 split was sharded beforehand (`tpi shard` / an earlier run left it in the cache):
              load = opening and checking the slices already on local disk

The goal: recovery < 2x TTFT for a model whose slices are on local disk (the SIGSTOP rows are dominated by
the timeout by construction: detection of a silent device cannot beat it).

    .venv/bin/python benchmarks/bench_failover.py [--worlds 3 4] [--synth small-100m --layers 4]
        [--prompt 64] [--at-token 4] [--timeout-s 4] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

import numpy as np

from tpicore.dist.session import ParallelSession
from tpicore.runtime.generate import Sampling, generate
from tpicore.runtime.session import GenerateOptions
from tpicore.tools.shard import cached_shards
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config

STAMP_AGE_S = 2.5  # weights.integrity trusts a verification stamp only for files older than 2 s


def model_dir(root: str, synth: str, layers: int) -> str:
    out = os.path.join(root, f"{synth}-{layers}L")
    if not os.path.isfile(os.path.join(out, "config.json")):
        config = dict(preset_config(synth), num_hidden_layers=layers)
        write_checkpoint(config, out, dtype="f32", seed=0, progress=False)
    return out


def one(model: str, n: int, how: str, prompt: list[int], new: int, at_token: int, timeout_s: float,
        cache: str, on_disk: bool) -> dict:
    os.environ["TPI_CACHE_DIR"] = os.path.join(cache, f"run-{n}-{how}-{time.monotonic_ns()}")  # a fresh cache
    if on_disk:  # the survivors' split, sharded beforehand into the same cache ("an earlier run left it"):
        cached_shards(model, n - 1, None, quiet=True)
        time.sleep(STAMP_AGE_S)  # files this fresh are never trusted from a verified stamp (integrity.py)
    opts = GenerateOptions(model=model, devices=n, timeout_s=timeout_s)
    max_seq = len(prompt) + new
    with ParallelSession(opts) as s:
        s.prepare(max_seq=max_seq)
        ttfts = [generate(s.step, prompt, new, Sampling(), (), max_seq).ttft_s for _ in range(2)]
        count = [0]

        def strike(_tok: int) -> None:
            count[0] += 1
            if count[0] == at_token:
                pid = [p.pid for p in s.workers.procs if int(p.name.rsplit("-", 1)[1]) == s.member_of[2]][0]
                os.kill(pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGSTOP)

        gen = generate(s.step, prompt, new, Sampling(), (), max_seq, on_token=strike)
        (rec,) = s.recoveries
        world = s.group.world_size
    return {"n": n, "how": how, "ttft_s": ttfts[-1], "rec": rec, "world": world,
            "next_token_s": gen.token_latencies_s[at_token - 1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--synth", default="small-100m")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--at-token", type=int, default=4)
    ap.add_argument("--timeout-s", type=float, default=4.0)
    ap.add_argument("--cache", default=None, help="model and shard folders (default: a temporary folder)")
    args = ap.parse_args()
    root = args.cache or tempfile.mkdtemp(prefix="bench-failover-")
    model = model_dir(root, args.synth, args.layers)
    vocab = preset_config(args.synth)["vocab_size"]
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, size=args.prompt)]
    print(f"model: {args.synth} with {args.layers} layers (f32, {model}); prompt {args.prompt} tokens, rank 2 "
          f"lost right after decode token {args.at_token}; timeout {args.timeout_s:g} s; host: "
          f"{os.cpu_count()} cores")
    head = f"{'N':>2} {'loss':>8} {'slices':>8} {'TTFT s':>8} {'detect':>7} {'re-plan':>8} {'load':>7} {'rebuild':>8} " \
           f"{'recovery':>9} {'next tok':>9} {'rec/TTFT':>9}  goal <2x"
    print(head)
    for n in args.worlds:
        for how, on_disk in (("SIGKILL", False), ("SIGKILL", True), ("SIGSTOP", True)):
            r = one(model, n, how, prompt, args.new, args.at_token, args.timeout_s, root, on_disk)
            rec = r["rec"]
            ratio = rec.total_s / r["ttft_s"]
            print(f"{n:>2} {how:>8} {'on disk' if on_disk else 'cold':>8} {r['ttft_s']:>8.3f} {rec.detect_s:>7.3f} {rec.replan_s:>8.3f} "
                  f"{rec.load_s:>7.3f} {rec.rebuild_s:>8.3f} {rec.total_s:>9.3f} {r['next_token_s']:>9.3f} "
                  f"{ratio:>9.2f}  {'yes' if ratio < 2 else 'no'}{' (timeout)' if how == 'SIGSTOP' else ''}",
                  flush=True)
    print("detect/re-plan/load/rebuild: tpicore.dist.failover.Recovery (host seconds); next tok: the latency "
          "of the token that waited for the recovery; TTFT: the same prompt on the same N devices, warm")


if __name__ == "__main__":
    main()
