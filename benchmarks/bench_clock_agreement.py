"""Wall clock vs virtual clock on the same experiment, side by side.

The virtual clock claims that each device's thread CPU time (plus the link model) is what a real device
would take. With N devices on a host with at least N free cores, the wall clock is the ground truth, so
the two must agree; the issue asks for 15% at N = 2 on this 2-core host. This runs one compute-heavy
experiment (by default a 4-layer slice of TinyLlama-1.1B's shapes: ~30 ms of compute per token per
device, about as much as its 1 ms star links cost) in both modes and prints TTFT, token latency and the
per-device compute time from each, with their ratio.

    python benchmarks/bench_clock_agreement.py [--model tinyllama-1.1b] [--layers 4] [--devices 2]
        [--latency 1ms] [--prompt 32] [--tokens 16] [--reps 3] [--out results/bench_clock_agreement.json]
        [--tolerance 0.15]   exit 1 when wall/virtual TTFT or token latency is off by more than this

The first repetition touches the weights for the first time (page faults): it is reported but the
medians are over the later ones. Run it on a quiet host: other processes on the cores slow the wall
clock (they wait for a core) but not the virtual one (it counts only the device's own CPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from emulator.config.run_config import load_run_config
from emulator.results.record import RunRecord
from emulator.run.launcher import Run


def experiment(args: argparse.Namespace, clock: str) -> dict:
    return {
        "name": f"bench-clock-{clock}",
        "topology": {"devices": {"count": args.devices, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                     "links": {"shape": "star", "latency_ms": args.latency, "bandwidth_mbps": args.bandwidth}},
        "model": {"synth": args.model, "layers": args.layers},
        "workload": {"prompt_lengths": [args.prompt], "new_tokens": args.tokens, "repetitions": args.reps},
        "options": {"clock": clock},
    }


def run(args: argparse.Namespace, clock: str) -> list[RunRecord]:
    cfg = load_run_config(None, doc=experiment(args, clock))
    out = Run(cfg, results_dir=args.results, cache_dir=args.cache_dir, progress=not args.quiet).run()
    bad = [r.error for r in out.records if r.error]
    if out.exit_code or bad or not out.records:
        sys.exit(f"{clock} run failed: {bad or out.exit_code}")
    return out.records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b", help="synth preset (default %(default)s)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--latency", default="1ms", help="per link; star shape: 2 links each way")
    p.add_argument("--bandwidth", default=None, help="per link (default unlimited)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--results", default="/tmp/tpi-bench/results", help="where the runs' JSONL lines go")
    p.add_argument("--cache-dir", default="/tmp/tpi-bench/emulator-cache", help="synthesized model + shards (1.2 GB "
                   "each by default; delete after)")
    p.add_argument("--out", help="also write the comparison as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tolerance", type=float, help="exit 1 when wall/virtual TTFT or token latency differs by more "
                   "than this fraction (the issue's criterion: 0.15 at 2 devices)")
    args = p.parse_args()

    recs = {clock: run(args, clock) for clock in ("virtual", "wall")}
    steady = {c: rs[1:] if len(rs) > 1 else rs for c, rs in recs.items()}

    def med(clock: str, f) -> float:
        return statistics.median(f(r) for r in steady[clock])

    rows = [("TTFT s", lambda r: r.timings.ttft_s), ("token latency s", lambda r: r.timings.token_latency_s)]
    for name in recs["virtual"][0].devices:
        rows.append((f"{name} compute s/run", lambda r, n=name: r.devices[n].time_split.compute_s))
        rows.append((f"{name} comm s/run", lambda r, n=name: r.devices[n].time_split.comm_s))
    cfg = recs["virtual"][0].config
    dims = cfg["model"]["config"]
    print(f"# {args.devices} devices, star links {args.latency} / {args.bandwidth or 'unlimited'}, "
          f"{args.model} x {dims['num_hidden_layers']} layers (hidden {dims['hidden_size']}, FFN "
          f"{dims['intermediate_size']}), prompt {args.prompt}, {args.tokens} tokens, median of runs 2..{args.reps}; "
          f"host {cfg['host']['cpus_usable']} cores, load {cfg['host']['loadavg'][0]:.2f}")
    print(f"{'metric':<22} {'virtual':>10} {'wall':>10} {'wall/virtual':>13}")
    table = []
    for label, f in rows:
        v, w = med("virtual", f), med("wall", f)
        ratio = w / v if v else float("nan")
        table.append({"metric": label, "virtual": v, "wall": w, "ratio": ratio})
        print(f"{label:<22} {v:>10.4f} {w:>10.4f} {ratio:>13.3f}")
    first = {c: (recs[c][0].timings.ttft_s, recs[c][0].timings.token_latency_s) for c in recs}
    print(f"# first run (cold weights): TTFT virtual {first['virtual'][0]:.4f} wall {first['wall'][0]:.4f}; "
          f"token latency virtual {first['virtual'][1]:.4f} wall {first['wall'][1]:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "table": table}, indent=1))
    if args.tolerance is not None:
        off = [row for row in table[:2] if not abs(row["ratio"] - 1) <= args.tolerance]
        if off:
            print(f"# outside the tolerance of {args.tolerance:.0%}: {', '.join(r['metric'] for r in off)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
