"""`python -m emulator`: run emulation experiments.

    python -m emulator run CONFIG.yaml [--set KEY=VALUE ...]     one experiment (a run config, see run_config.py)
    python -m emulator emulate [--devices 8 --latency 5ms ...]   configs/emulate.yaml with flag overrides
                                                                 (what `make emulate` runs)

Both print progress on stderr, append one JSON line per run to results/<name>.jsonl and print the
summary table on stdout. Exit codes: 0 runs completed (an OOM is a recorded result), 1 a device crashed
(recorded), 2 bad config or setup error (one `error: ...` line, nothing recorded), 130 Ctrl-C, 143 SIGTERM.
This file only parses flags; the work is in emulator.launcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tpicore.errors import TpiError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "emulate.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field, e.g. links.latency_ms=5 devices.count=4 workload.new_tokens=8 "
                        "(VALUE is YAML; repeatable)")
    p.add_argument("--name", help="experiment name (results/<name>.jsonl); default: the config's")
    p.add_argument("--mem-cap", metavar="SIZE", help="memory cap for every device, e.g. 2GiB "
                                                     "(default: each device's mem_bytes)")
    p.add_argument("--cgroup-root", metavar="DIR", help="a cgroup v2/v1 directory you own: enforce caps with "
                                                        "per-device child cgroups (removed after)")
    p.add_argument("--results", metavar="DIR", help="results folder (default: results/ in the checkout)")
    p.add_argument("--cache-dir", metavar="DIR", help="synthesized models, shards, device logs "
                                                      "(default: .cache/ in the checkout)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emulator", description="TPI-LLM emulation testbed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one experiment from a run config YAML")
    run.add_argument("config", metavar="CONFIG.yaml")
    _common(run)
    em = sub.add_parser("emulate", help="the default experiment (configs/emulate.yaml) with flag overrides")
    em.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config to start from (default: %(default)s)")
    em.add_argument("--devices", type=int, help="number of devices (devices.count)")
    em.add_argument("--latency", help="per-link latency, e.g. 5ms (links.latency_ms)")
    em.add_argument("--bandwidth", help="per-link bandwidth, e.g. 300mbps or unlimited (links.bandwidth_mbps)")
    em.add_argument("--window", help="sliding window in blocks (>= 2), or none for all weights resident")
    em.add_argument("--allreduce", choices=("star", "ring", "tree"))
    em.add_argument("--clock", choices=("virtual", "wall"))
    em.add_argument("--model", help="a checkpoint folder, or a synth preset name (e.g. small-100m)")
    _common(em)
    return parser


def overrides_for(args: argparse.Namespace) -> list[tuple[str, object]]:
    from emulator.run_config import parse_override

    out: list[tuple[str, object]] = []
    if args.command == "emulate":
        flags = {"devices.count": args.devices, "links.latency_ms": args.latency,
                 "links.bandwidth_mbps": args.bandwidth, "options.window": args.window,
                 "options.allreduce": args.allreduce, "options.clock": args.clock}
        out += [parse_override(f"{k}={v}") for k, v in flags.items() if v is not None]  # values read as YAML
        if args.model:
            from tpicore.synth import PRESETS

            if os.path.isdir(args.model):
                out.append(("model", {"path": os.path.abspath(args.model)}))
            elif args.model in PRESETS:
                out.append(("model", {"synth": args.model}))
            else:
                raise TpiError(f"--model: {args.model} is neither a checkpoint folder nor a synth preset "
                               f"({', '.join(PRESETS)})")
    out += [parse_override(o) for o in args.overrides]
    if args.name:
        out.append(("name", args.name))
    if args.mem_cap:
        out.append(("options.mem_cap", args.mem_cap))
    if args.cgroup_root:
        out.append(("options.cgroup_root", args.cgroup_root))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from emulator.launcher import EXIT_INTERRUPTED, EXIT_SETUP, Experiment
    from emulator.run_config import load_run_config

    try:
        cfg = load_run_config(args.config, overrides_for(args))
        outcome = Experiment(cfg, results_dir=args.results, cache_dir=args.cache_dir, progress=not args.quiet).run()
    except TpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.summary:
        print(outcome.summary, flush=True)
    return outcome.exit_code
