"""results/README.md's numbers, regenerated from results/*.jsonl (`python -m emulator readme`, `make results-readme`).

Layer: results (imports emulator.results.record and readme_blocks). The README holds prose and, between

    <!-- generated:NAME -->
    ...                      emulator/results/readme_blocks.py BLOCKS[NAME](records, paper tables)
    <!-- /generated:NAME -->

the text a block computes. `render` replaces every block's text and leaves the prose alone; a marker
naming no block, or an unclosed one, is an error naming the line. `--check` (and
tests/test_readme_generated.py) fails when the committed README differs from what the committed results
give, so the text cannot drift from the data. Must not run experiments.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from emulator.results.provenance import REPO
from emulator.results.readme_blocks import BLOCKS, Records, load_tables
from emulator.results.record import read_records
from tpicore.errors import TpiError

README = REPO / "results" / "README.md"
RESULTS = REPO / "results"
TABLES = REPO / "configs" / "paper_tables.yaml"
EXPERIMENTS = REPO / "configs" / "experiments"
OPEN = re.compile(r"^<!-- generated:([a-z0-9_]+) -->$")
CLOSE = "<!-- /generated:{} -->"


def read_results(results: Path) -> Records:
    """The lines of every experiment of configs/experiments/ (not results/emulate.jsonl, which is not
    committed: `make emulate` output)."""
    names = {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    return {p.stem: read_records(p) for p in sorted(results.glob("*.jsonl")) if p.stem in names}


def render(text: str, blocks: dict[str, str], source: str = "README") -> str:
    """`text` with each marked block's body replaced by blocks[NAME] (a block not in `blocks`: TpiError)."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        m = OPEN.match(line.strip())
        i += 1
        if not m:
            continue
        name = m.group(1)
        if name not in blocks:
            raise TpiError(f"{source}:{i}: generated:{name}: no such block (known: {', '.join(sorted(blocks))})")
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == CLOSE.format(name)), None)
        if end is None:
            raise TpiError(f"{source}:{i}: generated:{name}: no closing {CLOSE.format(name)}")
        out += [blocks[name].rstrip("\n"), lines[end]]
        i = end + 1
    return "\n".join(out)


def generate(readme: Path = README, results: Path = RESULTS, tables: Path = TABLES) -> tuple[str, str]:
    """(the README as committed, the README regenerated from the results)."""
    text = readme.read_text()
    recs, paper = read_results(results), load_tables(tables)
    names = {m.group(1) for m in (OPEN.match(line.strip()) for line in text.split("\n")) if m}
    blocks = {n: BLOCKS[n](recs, paper) for n in names if n in BLOCKS}
    return text, render(text, blocks, str(readme))


def main(check: bool = False, readme: Path = README, results: Path = RESULTS) -> int:
    """Rewrite the README's generated blocks (0), or with `check` report whether they are current (0/1)."""
    old, new = generate(readme, results)
    if old == new:
        print(f"{readme}: generated blocks are current")
        return 0
    if check:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(readme),
                                                   "regenerated"))
        print(f"{readme}: out of date; run `python -m emulator readme` (make results-readme)")
        return 1
    readme.write_text(new)
    print(f"{readme}: generated blocks rewritten")
    return 0
