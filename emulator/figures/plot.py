"""Figures of the paper's experiments, from results/*.jsonl only: `python -m emulator plot --all`.

Layer: figures (imports the figure modules of this package, emulator.figures.data, emulator.results.record).
Owns the registry (which function draws which experiment, from which kind of line) and the `plot` command's
flags. Must not run experiments or write results.

    results/<experiment>.jsonl     read_records (emulator/results/record.py); lines that are not results
      |                            lines, or of another kind or experiment, are noted and left out
      | latest sweep per point (data.latest_sweeps)
      + configs/paper_tables.yaml  the paper's tables as data
      v
    FIGURES[experiment](records, tables, out)  ->  results/figures/<experiment>.png
                                   fig1_fig3.py, tables.py, sweeps.py, stalls.py (one function per figure)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from emulator.figures import (
    failover,
    fig1_fig3,
    privacy,
    quantized,
    stalls,
    sweeps,
    tables,
)
from emulator.figures.data import (
    DEFAULT_RESULTS,
    DEFAULT_TABLES,
    NoData,
    latest_sweeps,
    load_tables,
)
from emulator.results.privacy_record import PrivacyRecord
from emulator.results.record import AllreduceRecord, RunRecord, read_records


@dataclass(frozen=True)
class FigureSpec:
    """One figure: the function that draws it and the kind of line it reads."""

    draw: Callable[[list, dict, Path], None]
    kind: type = RunRecord


FIGURES: dict[str, FigureSpec] = {
    "fig1_timeline": FigureSpec(fig1_fig3.fig1_timeline),
    "fig1_memory": FigureSpec(fig1_fig3.fig1_memory),
    "fig3_allreduce": FigureSpec(fig1_fig3.fig3_allreduce, AllreduceRecord),
    "table1": FigureSpec(tables.table1),
    "table2_6_memory": FigureSpec(tables.table2_6_memory),
    "fig5_scaling": FigureSpec(sweeps.fig5_scaling),
    "fig6_baselines": FigureSpec(tables.fig6_baselines),
    "table3_laptops": FigureSpec(tables.table3_laptops),
    "window_sweep": FigureSpec(sweeps.window_sweep),
    "link_latency_sweep": FigureSpec(sweeps.link_latency_sweep),
    "device_scaling": FigureSpec(sweeps.device_scaling),
    "stall_prediction": FigureSpec(stalls.stall_prediction),
    "privacy": FigureSpec(privacy.privacy, PrivacyRecord),
    "quantized": FigureSpec(quantized.quantized),
    "failover": FigureSpec(failover.failover),
}


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def figure_records(name: str, path: Path, kind: type) -> tuple[list, bool]:
    """The lines of experiment `name` in `path` that its figure reads (latest sweep per point), and whether
    the file held any line of that experiment, or unreadable ones (the left-out lines are noted on stderr)."""
    bad: list[str] = []
    records = read_records(path, on_bad=bad.append)
    for why in bad:
        note(f"{why}, skipped")
    mine, seen = [], bool(bad)
    for r in records:
        if r.experiment != name:
            continue
        seen = True
        if not isinstance(r, kind):
            note(f"{path}: a {type(r).__name__} line where {name} reads {kind.__name__} lines, skipped")
        elif isinstance(r, RunRecord) and r.setting is None:
            note(f"{path}: point {r.point}: its config did not resolve ({r.error}), skipped")
        else:
            mine.append(r)
    return latest_sweeps(mine), seen


def plot_experiments(names: list[str], results: Path, out_dir: Path, tables_path: Path | None = None,
                     quiet: bool = False) -> int:
    """Draw each named figure from results/<name>.jsonl; returns how many were written."""
    paper = load_tables(tables_path)
    written = 0
    for name in names:
        path = results / f"{name}.jsonl"
        if not path.is_file():
            print(f"{name}: skipped: no results ({path} does not exist; run the experiment first, "
                  f"e.g. `python -m emulator reproduce --experiment {name}`)", file=sys.stderr)
            continue
        spec = FIGURES[name]
        records, seen = figure_records(name, path, spec.kind)
        if not seen:
            print(f"{name}: skipped: {path} holds no lines of experiment {name}", file=sys.stderr)
            continue
        out = out_dir / f"{name}.png"
        try:
            spec.draw(records, paper, out)
        except NoData as e:
            print(f"{name}: skipped: {path}: {e}", file=sys.stderr)
            continue
        written += 1
        if not quiet:
            print(f"{name}: {out} ({len(records)} lines)")
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every figure that has results")
    which.add_argument("--experiment", action="append", metavar="NAME", choices=sorted(FIGURES),
                       help=f"one figure (repeatable): {', '.join(FIGURES)}")
    p.add_argument("--results", metavar="DIR", help="results folder (default: results/ in the checkout)")
    p.add_argument("--out", metavar="DIR", help="figures folder (default: <results>/figures)")
    p.add_argument("--paper-tables", metavar="YAML", help=f"the paper's tables (default: {DEFAULT_TABLES})")
    p.add_argument("--quiet", action="store_true", help="only report what was skipped")


def run(args: argparse.Namespace) -> int:
    """0 when at least one figure was written, 1 when none could be."""
    results = Path(args.results) if args.results else DEFAULT_RESULTS
    out = Path(args.out) if args.out else results / "figures"
    names = list(FIGURES) if args.all else args.experiment
    written = plot_experiments(names, results, out, Path(args.paper_tables) if args.paper_tables else None,
                               quiet=args.quiet)
    if not written:
        print(f"error: no figure could be drawn from {results}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulator.figures.plot", description="figures from results/*.jsonl")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
