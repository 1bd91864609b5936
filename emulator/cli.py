"""`python -m emulator`: run emulation experiments.

    python -m emulator run CONFIG.yaml [--set KEY=VALUE ...]     one run config (see run_config.py), or an
                                                                 experiment file (base + sweep, see
                                                                 experiments.py; --smoke: its tiny variant)
    python -m emulator emulate [--devices 8 --latency 5ms ...]   configs/emulate.yaml with flag overrides
                                                                 (what `make emulate` runs)
    python -m emulator reproduce [--only a,b] [--smoke]          every configs/experiments/*.yaml, then the
                                                                 figures (what `make reproduce` runs)
    python -m emulator plot --all | --experiment NAME            figures from results/*.jsonl (emulator/figures/)
    python -m emulator readme [--check]                          results/README.md's generated numbers from
                                                                 results/*.jsonl (emulator/results/readme.py)

A run config prints progress on stderr, appends one JSON line per run to results/<name>.jsonl and prints
the summary table on stdout; an experiment prints one line per sweep point and writes
results/<name>.jsonl when its sweep is done. Exit codes: 0 runs completed (an OOM is a recorded result),
1 a device crashed (recorded), 2 bad config or setup error (one `error: ...` line, nothing recorded),
130 Ctrl-C, 143 SIGTERM. This file only parses flags and hands the figures' drawing to the run layer; the
work is in emulator/run/ (launcher: one run config; experiments: sweeps). Layer: cli (may import every
emulator package).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from emulator.config.overrides import parse_override
from emulator.config.run_config import MODEL_DTYPES, load_run_config
from emulator.figures import plot
from emulator.results import readme
from emulator.run.experiments import (
    infeasible,
    is_experiment_file,
    reproduce,
    run_experiment,
)
from emulator.run.launcher import EXIT_INTERRUPTED, EXIT_SETUP, Run
from tpicore.errors import TpiError
from tpicore.tools.synth.presets import PRESETS
from tpicore.weights.gguf import is_gguf_path

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
    p.add_argument("--shaper", choices=("user", "kernel"), help="links shaped in user space (default), or by "
                   "the kernel: network namespaces + tbf, needs root and a wall clock (options.shaper)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emulator", description="TPI-LLM emulation testbed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one run config, or every point of an experiment file")
    run.add_argument("config", metavar="CONFIG.yaml")
    run.add_argument("--smoke", action="store_true", help="experiment files: the tiny variant (seconds; results "
                                                          "to .cache/smoke-results/ unless --results)")
    run.add_argument("--verbose", action="store_true", help="experiment files: each point's own progress too")
    _common(run)
    rep = sub.add_parser("reproduce", help="every experiment in configs/experiments/, then the figures")
    rep.add_argument("--only", metavar="NAMES", help="comma-separated experiment names (file stems)")
    rep.add_argument("--smoke", action="store_true", help="the tiny variants (results to .cache/smoke-results/ "
                                                          "unless --results)")
    rep.add_argument("--no-plot", action="store_true", help="do not draw the figures afterwards")
    rep.add_argument("--allow-dirty", action="store_true", help="run into results/ although the tree has "
                     "uncommitted changes (the lines record git_dirty: true)")
    rep.add_argument("--verbose", action="store_true", help="each point's own progress too")
    rep.add_argument("--results", metavar="DIR", help="results folder (default: results/ in the checkout)")
    rep.add_argument("--cache-dir", metavar="DIR", help="synthesized models, shards, device logs "
                                                        "(default: .cache/ in the checkout)")
    em = sub.add_parser("emulate", help="the default experiment (configs/emulate.yaml) with flag overrides")
    em.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config to start from (default: %(default)s)")
    em.add_argument("--devices", type=int, help="number of devices (devices.count)")
    em.add_argument("--latency", help="per-link latency, e.g. 5ms (links.latency_ms)")
    em.add_argument("--bandwidth", help="per-link bandwidth, e.g. 300mbps or unlimited (links.bandwidth_mbps)")
    em.add_argument("--window", help="sliding window in blocks (>= 2), or none for all weights resident")
    em.add_argument("--allreduce", choices=("star", "ring", "tree"))
    em.add_argument("--clock", choices=("virtual", "wall"))
    em.add_argument("--model", help="a checkpoint folder, a .gguf file, or a synth preset name (e.g. small-100m)")
    em.add_argument("--dtype", choices=MODEL_DTYPES, help="a synth preset's stored weights (model.dtype): f32, bf16, "
                                                         "q8_0, q4_k, ...")
    _common(em)
    plot.add_arguments(sub.add_parser("plot", help="figures from results/*.jsonl (emulator/figures/)"))
    rd = sub.add_parser("readme", help="regenerate results/README.md's numbers from results/*.jsonl")
    rd.add_argument("--check", action="store_true", help="only say whether they are current (exit 1 if not)")
    return parser


def draw_figures(names: Sequence[str], results: Path) -> int:
    """The figures of these experiments (those that have one) into <results>/figures/; 0 if any was drawn."""
    known = [n for n in names if n in plot.FIGURES]
    return 0 if plot.plot_experiments(known, results, results / "figures") else 1


def overrides_for(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The command line as (dotted key, value) overrides: emulate's flags first, then --set, then the rest."""
    out: list[tuple[str, object]] = []
    if args.command == "emulate":
        flags = {"devices.count": args.devices, "links.latency_ms": args.latency,
                 "links.bandwidth_mbps": args.bandwidth, "options.window": args.window,
                 "options.allreduce": args.allreduce, "options.clock": args.clock}
        out += [parse_override(f"{k}={v}") for k, v in flags.items() if v is not None]  # values read as YAML
        if args.model:
            if os.path.isdir(args.model) or is_gguf_path(args.model):
                out.append(("model", {"path": os.path.abspath(args.model)}))
            elif args.model in PRESETS:
                out.append(("model", {"synth": args.model}))
            else:
                raise TpiError(f"--model: {args.model} is neither a checkpoint folder nor a synth preset "
                               f"({', '.join(PRESETS)})")
        if args.dtype:
            out.append(("model.dtype", args.dtype))
    out += [parse_override(o) for o in args.overrides]
    if args.name:
        out.append(("name", args.name))
    if args.mem_cap:
        out.append(("options.mem_cap", args.mem_cap))
    if args.cgroup_root:
        out.append(("options.cgroup_root", args.cgroup_root))
    if args.shaper:
        out.append(("options.shaper", args.shaper))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "plot":
        return plot.run(args)
    if args.command == "readme":
        try:
            return readme.main(check=args.check)
        except TpiError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_SETUP
    try:  # setup errors are one line and EXIT_SETUP, Ctrl-C EXIT_INTERRUPTED, for every command
        return _dispatch(args)
    except TpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    for flag, path in (("--results", args.results), ("--cache-dir", args.cache_dir)):  # refused before any start
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise TpiError(f"{flag}: {path} is a file, not a folder")
    if args.command == "reproduce":
        only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
        return reproduce(only, smoke=args.smoke, results_dir=args.results, cache_dir=args.cache_dir,
                         verbose=args.verbose, draw=None if args.no_plot else draw_figures,
                         allow_dirty=args.allow_dirty)
    if args.command == "run":
        if is_experiment_file(args.config):
            if args.name or args.mem_cap or args.cgroup_root:
                raise TpiError("--name/--mem-cap/--cgroup-root: not for experiment files "
                               "(use --set options.mem_cap=...)")
            out = run_experiment(args.config, args.results, args.cache_dir, smoke=args.smoke,
                                 overrides=overrides_for(args), verbose=args.verbose and not args.quiet)
            return EXIT_INTERRUPTED if out.interrupted else (1 if out.failed else 0)
        if args.smoke:
            raise TpiError(f"--smoke: {args.config} is a run config, not an experiment file")

    cfg = load_run_config(args.config, overrides_for(args))
    why = infeasible(cfg) if args.command == "emulate" else None
    if why:  # before preparing the model: name the limit and a model that fits (MODEL=...)
        raise TpiError(f"--devices: {why}")
    outcome = Run(cfg, results_dir=args.results, cache_dir=args.cache_dir, progress=not args.quiet).run()
    if outcome.summary:
        print(outcome.summary, flush=True)
    return outcome.exit_code
