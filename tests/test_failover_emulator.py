"""Faults in the emulator (issue 15): `faults:` in a run config is validated naming the file and the field;
a device crashed, hung or cut off at a token of an emulated run is recovered by the master (ElasticMaster),
the run completes with the tokens of an uninterrupted run on the N - 1 survivors, its results line records
the fault and the recovery, and no device process is left running."""

from __future__ import annotations

import os

import pytest

from emulator.config.run_config import load_run_config
from emulator.results.record import read_records
from emulator.run.launcher import EXIT_OK, Run
from tpicore.errors import TpiError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Synthesized models and shards, shared by this module's tests."""
    return tmp_path_factory.mktemp("emu-cache")


def config(n=3, faults=(), new_tokens=6, clock="wall", **options):
    return {
        "name": "fo",
        "topology": {"devices": {"count": n, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                     "links": {"shape": "star", "latency_ms": 1.0}},
        "model": {"synth": "tiny"},
        "workload": {"prompt_lengths": [6], "new_tokens": new_tokens, "repetitions": 1},
        "options": {"clock": clock, "timeout_s": 3, **options},
        "faults": list(faults),
    }


def test_a_fault_config_is_parsed():
    cfg = load_run_config(None, doc=config(faults=[{"device": 2, "at_token": 3, "kind": "crash"},
                                                   {"device": 1, "at_token": 0, "kind": "link_down",
                                                    "duration_s": 2}]))
    assert [(f.device, f.at_token, f.kind, f.duration_s, f.run) for f in cfg.faults] == [
        (2, 3, "crash", None, 0), (1, 0, "link_down", 2.0, 0)]
    assert cfg.options.failover is True and cfg.options.slices == "local"
    assert cfg.to_json()["faults"][0]["device"] == 2
    assert "faults" not in load_run_config(None, doc=config()).to_json()  # lines without faults unchanged


@pytest.mark.parametrize("fault, options, message", [
    ({"device": 0, "at_token": 1, "kind": "crash"}, {}, "faults[0].device: must be an integer >= 1, got 0"),
    ({"device": 3, "at_token": 1, "kind": "crash"}, {}, "faults[0].device: 3 is not a worker rank (1..2 on 3"),
    ({"device": 2, "at_token": -1, "kind": "crash"}, {}, "faults[0].at_token: must be an integer >= 0, got -1"),
    ({"device": 2, "at_token": 6, "kind": "crash"}, {}, "faults[0].at_token: 6: the run generates 6 tokens"),
    ({"device": 2, "at_token": 1, "kind": "melt"}, {}, "faults[0].kind: expected one of crash, hang, link_down"),
    ({"device": 2, "at_token": 1, "kind": "link_down"}, {}, "faults[0].duration_s: missing"),
    ({"device": 2, "at_token": 1, "kind": "crash", "duration_s": 1}, {}, "faults[0].duration_s: a crash has no"),
    ({"device": 2, "at_token": 1, "kind": "hang", "duration_s": -1}, {}, "faults[0].duration_s: must be > 0"),
    ({"device": 2, "at_token": 1, "kind": "crash", "when": 3}, {}, "faults[0].when: unknown key"),
    ({"device": 2, "at_token": 1, "kind": "crash"}, {"clock": "virtual"}, "faults[0].kind: needs options.clock: wall"),
    ({"device": 2, "at_token": 1, "kind": "crash"}, {"mode": "pipeline"}, "faults[0].device: options.mode 'pipeline'"),
    ({"device": 2, "at_token": 1, "kind": "crash", "run": 1}, {}, "faults[0].run: 1: the workload has 1 runs"),
])
def test_a_bad_fault_is_refused_naming_the_file_and_field(fault, options, message):
    doc = config(faults=[fault])
    doc["options"].update(options)
    with pytest.raises(TpiError) as e:
        load_run_config(None, doc=doc, source="exp.yaml")
    assert str(e.value).startswith("exp.yaml: ") and message in str(e.value), str(e.value)


def test_bad_options_are_refused():
    doc = config()
    doc["options"]["slices"] = "cloud"
    with pytest.raises(TpiError, match="options.slices: expected one of local, master"):
        load_run_config(None, doc=doc)
    doc = config(faults=[{"device": 1, "at_token": 1, "kind": "crash"}, {"device": 1, "at_token": 2, "kind": "hang"}])
    with pytest.raises(TpiError, match=r"faults\[1\].device: device 1 is lost twice"):
        load_run_config(None, doc=doc)


def run(doc, tmp_path, cache):
    cfg = load_run_config(None, doc=doc)
    r = Run(cfg, results_dir=tmp_path / "results", cache_dir=cache, progress=False)
    out = r.run()
    return out, r.procs


def gone(procs) -> bool:
    """Every device process has exited and been reaped (no zombie, no stopped process)."""
    for p in procs.values():
        if p.exitcode is None:
            return False
        try:
            os.kill(p.pid, 0)
            return False
        except ProcessLookupError:
            pass
    return True


@pytest.mark.parametrize("kind, device, at_token, slices", [
    ("crash", 2, 3, "local"),  # mid-decode, the survivors re-shard their own copies
    ("crash", 1, 0, "master"),  # before the prompt: the prefill step sees it; rank 0 sends the slices
    ("hang", 2, 2, "master"),  # SIGSTOP: found by the timeout
])
def test_a_lost_device_is_recovered_with_the_tokens_of_n_minus_1(tmp_path, cache, kind, device, at_token, slices):
    fault = {"device": device, "at_token": at_token, "kind": kind}
    out, procs = run(config(3, [fault], slices=slices), tmp_path / "fault", cache)
    assert out.exit_code == EXIT_OK, out.summary
    ref, _ = run(config(2), tmp_path / "ref", cache)
    (rec,) = read_records(out.results_path)
    (want,) = read_records(ref.results_path)
    assert rec.error is None and rec.timings.tokens == want.timings.tokens  # an uninterrupted run on N - 1
    assert [vars(f) for f in rec.faults] == [{**fault, "duration_s": None, "run": 0}]
    (r,) = rec.recoveries
    assert list(r.lost) == [str(device)] and (r.world_before, r.world_after) == (3, 2)
    assert r.lost[str(device)].startswith("silent" if kind == "hang" else "disconnected")
    assert r.replayed_tokens == (0 if at_token == 0 else 6 + at_token - 1)
    assert r.token == at_token + 1  # the first token produced after the fault waited for the recovery
    assert r.total_s == pytest.approx(r.detect_s + r.replan_s + r.load_s + r.rebuild_s)
    survivors = [n for n in ("d0", "d1", "d2") if n != f"d{device}"]
    assert sorted(n for n, d in rec.devices.items() if d.time_split is not None) == survivors
    assert gone(procs)


def test_a_short_link_down_is_a_stall_not_a_loss(tmp_path, cache):
    fault = {"device": 2, "at_token": 2, "kind": "link_down", "duration_s": 0.5}
    out, procs = run(config(3, [fault]), tmp_path, cache)
    assert out.exit_code == EXIT_OK, out.summary
    (rec,) = read_records(out.results_path)
    assert rec.error is None and rec.recoveries == () and len(rec.faults) == 1
    assert len(rec.timings.tokens) == 6 and gone(procs)
