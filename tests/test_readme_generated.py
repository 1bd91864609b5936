"""results/README.md's numbers are generated from results/*.jsonl (emulator/results/readme.py): regenerating
them from the committed lines gives the committed text, and the marker syntax is checked."""

from __future__ import annotations

import pytest

from emulator.results import readme
from emulator.results.readme_blocks import BLOCKS
from tpicore.errors import TpiError


def test_committed_readme_matches_the_committed_results():
    old, new = readme.generate()
    assert old == new, "results/README.md is out of date: run `python -m emulator readme` (make results-readme)"


def test_every_block_is_used_and_every_marker_has_a_block():
    text = readme.README.read_text()
    used = {m.group(1) for m in (readme.OPEN.match(line.strip()) for line in text.split("\n")) if m}
    assert used == set(BLOCKS)


def test_the_audited_claims_are_generated_numbers():
    _, text = readme.generate()
    assert "differs from the paper's row by 1.1% to 38.3%" in text  # Tables 2/6, not "within 2-25%"
    assert "2.3-37.7x ours" in text
    assert "TPI is faster than galaxy on 4 of 5 models by measured token latency (not on llama-2-70b)" in text
    assert "planner a priori" in text and "replay" not in text.split("## Stall prediction")[1]


def test_render_replaces_only_marked_text_and_names_bad_markers():
    text = "intro\n<!-- generated:a -->\nold\n<!-- /generated:a -->\nprose"
    assert readme.render(text, {"a": "new"}) == "intro\n<!-- generated:a -->\nnew\n<!-- /generated:a -->\nprose"
    with pytest.raises(TpiError, match=r"README:2: generated:b: no such block"):
        readme.render(text.replace(":a", ":b"), {"a": "x"})
    with pytest.raises(TpiError, match="no closing"):
        readme.render("<!-- generated:a -->\nold", {"a": "x"})


def test_check_reports_a_drifted_readme(tmp_path, capsys):
    drifted = tmp_path / "README.md"
    drifted.write_text(readme.README.read_text().replace("| table1 |", "| table1 (edited) |", 1)
                       .replace("Memory per device with the scheduler is", "Memory is", 1))
    assert readme.main(check=True, readme=drifted) == 1
    assert "out of date" in capsys.readouterr().out
    assert readme.main(readme=drifted) == 0 and drifted.read_text() == readme.README.read_text()
