"""Provenance (emulator/results/provenance.py, emulator/run/experiments.py): every line carries the commit,
a dirty flag and the host load; `reproduce` refuses a dirty tree and a second reproduce; windowed points
carry the planner's a-priori prediction; `make emulate` runs 16 and 32 devices with the default model."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from emulator import cli
from emulator.results import provenance
from emulator.results.planned import planned_stall
from emulator.results.provenance import Provenance, ProvenanceProbe, exclusive_lock
from emulator.results.record import RunRecord, read_records, record_from_json
from emulator.run.experiments import EXPERIMENTS_DIR, reproduce, run_experiment
from tpicore.errors import TpiError

ROOT = Path(__file__).resolve().parents[1]


def test_committed_lines_without_provenance_still_read():
    for path in sorted((ROOT / "results").glob("*.jsonl")):
        for rec in read_records(path):
            if rec.provenance is None:  # written before it existed
                continue
            assert rec.provenance.git_commit and len(rec.provenance.load_start) == 3


def test_provenance_round_trips_through_a_line():
    line = json.loads((ROOT / "results" / "table1.jsonl").read_text().splitlines()[0])
    rec = record_from_json(line)
    stamped = dataclasses.replace(rec, provenance=ProvenanceProbe(provenance.CodeState("abc", True)).stamp())
    back = record_from_json(json.loads(json.dumps(stamped.to_json())))
    assert back.provenance == stamped.provenance and back.provenance.git_dirty is True
    assert back.provenance.load_max >= 0 and back.to_json()["provenance"]["load_sampling"]
    assert "provenance" not in rec.to_json()  # an old line stays as it was


def test_dirty_tree_is_refused_unless_allowed(monkeypatch):
    assert provenance.dirty_paths(Path("/")) is None  # not a checkout: unknown, never "clean"
    monkeypatch.setattr(provenance, "code_state", lambda root=provenance.REPO: provenance.CodeState("f" * 40, True))
    monkeypatch.setattr(provenance, "dirty_paths", lambda root=provenance.REPO: ["tpicore/x.py"])
    with pytest.raises(TpiError, match=r"1 changed path\(s\) outside results/ \(e\.g\. tpicore/x\.py\).*--allow-dirty"):
        reproduce(only=["fig3_allreduce"])  # into the committed results/: refused before anything runs
    assert provenance.require_clean(True) == "ffffffffffff (dirty: allowed)"


def test_a_second_reproduce_is_refused(tmp_path):
    lock = tmp_path / "reproduce.lock"
    fd = exclusive_lock(lock, "reproduce")
    try:
        with pytest.raises(TpiError, match=r"another reproduce is running \(pid \d+"):
            exclusive_lock(lock, "reproduce")
    finally:
        os.close(fd)
    os.close(exclusive_lock(lock, "reproduce"))  # released with its descriptor


def test_smoke_lines_carry_provenance_and_the_planners_prediction(tmp_path):
    said: list[str] = []
    out = run_experiment(EXPERIMENTS_DIR / "stall_prediction.yaml", tmp_path / "r", tmp_path / "c", smoke=True,
                         say=said.append)
    assert out.failed == 0 and out.records
    for rec in read_records(tmp_path / "r" / "stall_prediction.jsonl"):
        assert isinstance(rec, RunRecord) and isinstance(rec.provenance, Provenance)
        assert rec.provenance.git_commit == provenance.git_commit()
        assert rec.prediction and rec.prediction == planned_stall(rec.config)  # a function of the config alone
    assert any("planner's stall" in line for line in said)


def test_planned_stall_reads_no_measurement():
    rec = read_records(ROOT / "results" / "stall_prediction.jsonl")[0]
    blank = dataclasses.replace(rec, devices={}, timings=dataclasses.replace(rec.timings, ttft_s=None))
    assert planned_stall(blank.config) == planned_stall(rec.config)
    assert max(planned_stall(rec.config).values()) > 0


FAST = ["--window", "none", "--set", "options.compute=free", "--set", "model.layers=1", "--set",
        "workload.new_tokens=2", "--set", "workload.prompt_lengths=[2]", "--set", "workload.repetitions=1",
        "--quiet"]


@pytest.fixture(scope="module")
def emulate_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emulate-cache")


@pytest.mark.parametrize("n", [16, 32])
def test_make_emulate_runs_up_to_32_devices_with_the_default_model(n, tmp_path, emulate_cache):
    code = cli.main(["emulate", "--devices", str(n), "--results", str(tmp_path), "--cache-dir", str(emulate_cache),
                     *FAST])
    assert code == 0
    (rec,) = read_records(tmp_path / "emulate.jsonl")
    assert rec.error is None and rec.setting.world_size == n and rec.provenance is not None
    assert rec.setting.model.dims["num_attention_heads"] >= 32


def test_emulate_beyond_the_heads_names_the_limit_and_a_model(tmp_path, capsys):
    assert cli.main(["emulate", "--devices", "33", "--results", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --devices: tpi: 33 devices cannot split 32 attention heads") and "llama-2-70b" in err
    assert not (tmp_path / "emulate.jsonl").exists()
