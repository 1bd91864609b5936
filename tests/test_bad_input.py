"""Bad input of every kind ends in one `error:` line naming the flag, file or field, exit 2, nothing
half-written: a table of flags for every `tpi` subcommand and `python -m emulator`, a table of config.json
fields and emulator YAML fields, property-based malformed configs (hypothesis), and a double signal
during the emulator's cleanup, which must still remove everything."""

from __future__ import annotations

import errno
import json
import math
import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_launcher import (
    _cli,
    _leaked_schedules,
    _ours,
    _schedules,
    _wait_ready,
    config,
)

from emulator import cli as emulator_cli
from emulator.config.run_config import load_run_config
from emulator.results import record as R
from tpicore import cli
from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.tools import shard as S
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    model = str(write_checkpoint(preset_config("tiny"), root / "tiny", progress=False))
    shards = str(root / "shards")
    S.shard_checkpoint(model, shards, 2, quiet=True)
    return {"M": model, "S": shards, "F": os.path.join(model, "config.json"), "D": str(root),
            "OUT": str(root / "out")}


def one_error(capsys, argv: list[str], main=cli.main) -> str:
    """Run a CLI in process; assert exit 2 and exactly one stderr line, an `error:` one. Returns it."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals (a type= check)
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, rc, err)
    return lines[0]


GEN = ["generate", "--model", "{M}", "--prompt-ids", "1,2"]

CASES: list[tuple[list[str], str]] = [
    # tpi generate: numbers
    (GEN + ["--temperature", "nan"], "--temperature: expected a finite number >= 0"),
    (GEN + ["--temperature", "inf"], "--temperature: expected a finite number >= 0"),
    (GEN + ["--temperature", "-1"], "--temperature"),
    (GEN + ["--top-p", "nan"], "--top-p"),
    (GEN + ["--top-p", "0"], "--top-p"),
    (GEN + ["--top-p", "1.5"], "--top-p"),
    (GEN + ["--top-k", "-1"], "--top-k"),
    (GEN + ["--seed", "-1"], "--seed: expected an integer >= 0"),
    (GEN + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (GEN + ["--max-new-tokens", "-5"], "--max-new-tokens"),
    (GEN + ["--devices", "0"], "--devices"),
    (GEN + ["--devices", "-2"], "--devices"),
    (GEN + ["--devices", "2", "--timeout-s", "nan"], "--timeout-s: expected a finite number > 0"),
    (GEN + ["--devices", "2", "--timeout-s", "inf"], "--timeout-s"),
    (GEN + ["--devices", "2", "--timeout-s", "-1"], "--timeout-s"),
    (GEN + ["--devices", "2", "--timeout-s", "0"], "--timeout-s"),
    (GEN + ["--devices", "2", "--ratios", "1e308,1e308"], "--ratios: expected finite shares"),
    (GEN + ["--devices", "2", "--ratios", "inf,1"], "--ratios"),
    (GEN + ["--devices", "2", "--ratios", "nan,1"], "--ratios"),
    (GEN + ["--devices", "2", "--ratios", "1,0"], "--ratios"),
    (GEN + ["--devices", "2", "--ratios", "1,x"], "--ratios"),
    (GEN + ["--devices", "2", "--ratios", "1,1,1"], "--ratios"),
    (GEN + ["--window", "1"], "--window"),
    (GEN + ["--window", "2", "--retain-every", "-1"], "--retain-every"),
    (GEN + ["--devices", "2", "--listen", "127.0.0.1:99999"], "--listen: expected HOST:PORT"),
    (GEN + ["--devices", "2", "--listen", "127.0.0.1:-1"], "--listen"),
    (GEN + ["--devices", "2", "--listen", ":80"], "--listen"),
    (GEN + ["--devices", "2", "--listen", "noport"], "--listen"),
    (["generate", "--model", "{M}", "--prompt", "\udcff\udcfe"], "--prompt: not valid UTF-8"),
    (["generate", "--model", "{M}", "--prompt-ids", "1,x"], "--prompt-ids"),
    (["generate", "--model", "{M}", "--prompt-ids", "1,100000"], "--prompt-ids"),
    (["generate", "--prompt-ids", "1"], "--model or --shards is required"),
    # flags that would be silently ignored
    (GEN + ["--ratios", "2"], "--ratios: needs --devices N > 1"),
    (GEN + ["--retain-every", "2"], "--retain-every: needs --window"),
    (GEN + ["--shards", "{S}", "--devices", "2"], "--model and --shards: give one, not both"),
    (GEN + ["--secret-file", "{F}"], "--secret-file: needs --listen"),
    # paths
    (GEN + ["--trace", "{D}"], "--trace: '{D}' is a folder"),
    (GEN + ["--dump-logits", "{D}"], "--dump-logits: '{D}' is a folder"),
    (GEN + ["--trace", "{D}/missing/t.json"], "--trace: folder {D}/missing does not exist"),
    (GEN + ["--dump-logits", "{D}/missing/l.npy"], "--dump-logits: folder"),
    (["generate", "--model", "{F}", "--prompt-ids", "1"], "{F}: a file, not a model folder"),
    (["generate", "--model", "{D}/nope", "--prompt-ids", "1"], "{D}/nope"),
    (["generate", "--model", "{F}", "--prompt-ids", "1", "--devices", "2"], "{F}"),
    (["generate", "--shards", "{F}", "--prompt-ids", "1", "--devices", "2"], "--shards"),
    (["generate", "--shards", "{S}", "--prompt-ids", "1", "--devices", "3"], "not --devices 3"),
    # tpi plan
    (["plan", "--preset", "tiny", "--devices", "0"], "--devices: expected an integer >= 1, got 0"),
    (["plan", "--preset", "tiny", "--devices", "-1"], "--devices"),
    (["plan", "--preset", "tiny", "--window", "1"], "--window"),
    (["plan", "--preset", "tiny", "--retain-every", "-1"], "--retain-every"),
    (["plan", "--preset", "tiny", "--max-seq", "0"], "--max-seq"),
    (["plan", "--preset", "tiny", "--disk-gbps", "nan"], "--disk-gbps"),
    (["plan", "--preset", "tiny", "--disk-gbps", "0"], "--disk-gbps"),
    (["plan", "--preset", "tiny", "--gemv-gbps", "inf"], "--gemv-gbps"),
    (["plan", "--preset", "tiny", "--allreduce-ms", "-1"], "--allreduce-ms"),
    (["plan", "--preset", "tiny", "--dequant-melems", "0"], "--dequant-melems"),
    (["plan", "--preset", "nope"], "nope"),
    (["plan", "--model", "{F}"], "{F}"),
    (["plan", "--model", "{D}/nope"], "--model"),
    # tpi shard
    (["shard", "--model", "{M}", "--devices", "0", "--out", "{OUT}"], "--devices"),
    (["shard", "--model", "{M}", "--devices", "2", "--ratios", "nan,1", "--out", "{OUT}"], "--ratios"),
    (["shard", "--model", "{M}", "--devices", "1", "--ratios", "2", "--out", "{OUT}"], "--ratios: needs"),
    (["shard", "--model", "{F}", "--devices", "2", "--out", "{OUT}"], "--model: {F} is a file, not a folder"),
    (["shard", "--model", "{D}/nope", "--devices", "2", "--out", "{OUT}"], "--model"),
    (["shard", "--model", "{M}", "--devices", "99", "--out", "{OUT}"], "--devices"),
    (["shard", "--model", "{M}", "--devices", "2", "--out", "{F}"], "{F}"),
    # tpi synth
    (["synth", "tiny", "--out", "{OUT}", "--devices", "2", "--unique-layers", "0"], "--unique-layers"),
    (["synth", "tiny", "--out", "{OUT}", "--seed", "-1"], "--seed"),
    (["synth", "tiny", "--out", "{OUT}", "--shards", "0"], "--shards"),
    (["synth", "tiny", "--out", "{OUT}", "--devices", "0"], "--devices"),
    (["synth", "tiny", "--out", "{OUT}", "--layers", "0"], "--layers"),
    (["synth", "tiny", "--out", "{OUT}", "--ratios", "1,1"], "--ratios: needs"),
    (["synth", "tiny", "--out", "{OUT}", "--max-shard-bytes", "1e400GiB"], "--max-shard-bytes"),
    (["synth", "nope", "--out", "{OUT}"], "nope"),
    # tpi worker
    (["worker", "--rank", "0", "--master", "127.0.0.1:5000", "--shards", "{S}"], "--rank"),
    (["worker", "--rank", "1", "--master", "127.0.0.1:99999", "--shards", "{S}"], "--master"),
    (["worker", "--rank", "1", "--master", "nocolon", "--shards", "{S}"], "--master"),
    (["worker", "--rank", "1", "--master", "127.0.0.1:5000", "--shards", "{S}", "--timeout-s", "nan"],
     "--timeout-s"),
    (["worker", "--rank", "1", "--master", "127.0.0.1:5000", "--shards", "{S}", "--threads", "0"], "--threads"),
    (["worker", "--rank", "1", "--master", "127.0.0.1:5000", "--shards", "{F}"], "--shards"),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a[:1] + a[5:] if a[:1] == ["generate"] else a)[:60]
                                                     for a, _ in CASES])
def test_bad_flag_is_one_error_line(paths, capsys, argv, expected):
    fill = {k: v for k, v in paths.items()}
    argv = [a.format(**fill) for a in argv]
    line = one_error(capsys, argv)
    assert expected.format(**fill) in line, line
    assert not os.path.exists(paths["OUT"])  # nothing half-written
    assert not [n for n in os.listdir(paths["D"]) if n.startswith(".tmp-")]


def test_flag_table_covers_every_subcommand():
    assert {a[0] for a, _ in CASES} >= {"generate", "plan", "shard", "synth", "worker"}


# ---------------------------------------------------------------------------------------------
# config.json fields


JUNK = [None, True, "abc", "3", -1, 0, 1e400, math.nan, [], [1], {}, {"a": 1}, 2**70]
RAISES = {  # field -> values that must be refused (the rest of JUNK may be legal: e.g. head_dim null)
    "rms_norm_eps": ["abc", -1, 0, 1e400, math.nan, [], {}],
    "rope_theta": ["abc", -1, 0, 1e400, math.nan, [1]],
    "rope_scaling": ["abc", [1], 3, True],
    "rope_parameters": ["abc", [1], 3],
    "hidden_size": [None, "abc", -1, 0, 1e400, [1]],
    "num_hidden_layers": ["abc", -1, 0, [1], 1.5],
    "num_attention_heads": ["abc", -1, 0],
    "vocab_size": ["abc", -1, 0, None],
    "intermediate_size": ["abc", -1, 0],
    "max_position_embeddings": ["abc", -1, 0],
    "hidden_act": ["relu", 1],
    "model_type": ["gpt2", 1],
    "eos_token_id": [10**6, -1],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in RAISES.items() for v in vs],
                         ids=[f"{f}={v!r}"[:40] for f, vs in RAISES.items() for v in vs])
def test_bad_config_field_refused_naming_it(field, value):
    d = preset_config("tiny")
    d[field] = value
    with pytest.raises(TpiError) as e:
        ModelConfig.from_dict(d, source="x/config.json")
    msg = str(e.value)
    assert msg.startswith("x/config.json: ") and "\n" not in msg
    assert field.split("_token")[0] in msg or "hidden_size" in msg or "head" in msg, msg


@pytest.mark.parametrize("key", ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                                 "rope_type"])
def test_bad_rope_scaling_entries_never_a_traceback(key):
    for value in JUNK:
        d = preset_config("tiny")
        d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32, key: value}
        try:
            ModelConfig.from_dict(d, source="c.json")
        except TpiError as e:
            assert str(e).startswith("c.json: ")


def test_bad_config_through_the_cli(paths, tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    for name in os.listdir(paths["M"]):
        os.symlink(os.path.join(paths["M"], name), m / name)
    cfg = json.load(open(os.path.join(paths["M"], "config.json")))
    for change in ({"rms_norm_eps": "abc"}, {"rope_scaling": "linear"}, {"rope_scaling": [1]}):
        (m / "config.json").unlink()
        (m / "config.json").write_text(json.dumps({**cfg, **change}))
        line = one_error(capsys, ["generate", "--model", str(m), "--prompt-ids", "1"])
        assert str(m / "config.json") in line and next(iter(change)) in line
    (m / "config.json").write_bytes(b"\xff\xfe{")
    assert "not valid JSON" in one_error(capsys, ["generate", "--model", str(m), "--prompt-ids", "1"])


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=6), st.lists(st.integers(-2, 2), max_size=2),
                   st.dictionaries(st.sampled_from(["rope_type", "factor", "type", "x"]),
                                   st.one_of(st.text(max_size=6), st.floats(), st.integers()), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(sorted(preset_config("tiny")) + ["rope_parameters", "head_dim",
                                                                               "sliding_window"]),
                               VALUES, min_size=1, max_size=4),
       drop=st.lists(st.sampled_from(sorted(preset_config("tiny"))), max_size=2))
def test_malformed_configs_one_line_never_a_traceback(changes, drop):
    d = preset_config("tiny")
    d.update(changes)
    for key in drop:
        d.pop(key, None)
    try:
        ModelConfig.from_dict(d, source="gen/config.json")
    except TpiError as e:
        assert str(e).startswith("gen/config.json") and "\n" not in str(e)


# ---------------------------------------------------------------------------------------------
# emulator YAML fields and flags


EMU_CASES = [
    ("options.mem_cap", "1e400GiB", "options.mem_cap"),
    ("options.mem_cap", "abc", "options.mem_cap"),
    ("options.mem_cap", -1, "options.mem_cap"),
    ("options.timeout_s", math.inf, "options.timeout_s"),
    ("options.timeout_s", math.nan, "options.timeout_s"),
    ("options.timeout_s", 0, "options.timeout_s"),
    ("options.timeout_s", "1e400", "options.timeout_s"),
    ("options.window", 1, "options.window"),
    ("options.retain_every", -1, "options.retain_every"),
    ("options.ratios", [1e308] * 8, "options.ratios"),
    ("options.ratios", [math.nan] * 8, "options.ratios"),
    ("options.ratios", "x", "options.ratios"),
    ("options.allreduce", "x", "options.allreduce"),
    ("links.latency_ms", math.inf, "links.latency_ms"),
    ("links.latency_ms", "1e400ms", "links.latency_ms"),
    ("links.bandwidth_mbps", math.nan, "links.bandwidth_mbps"),
    ("devices.count", 0, "devices.count"),
    ("devices.count", 10**6, "devices.count: must be at most"),
    ("devices.mem_bytes", "1e400GiB", "mem_bytes"),
    ("model.synth", "nope", "model"),
    ("workload.new_tokens", 0, "workload.new_tokens"),
    ("workload.prompt_lengths", [], "workload.prompt_lengths"),
    # absurd sizes and counts: refused naming the field and the allowed range
    ("model.layers", 10**30, "model.layers: must be an integer in [1, 1024], got 1e+30"),
    ("model.layers", 1e30, "model.layers: must be an integer >= 1, got 1e+30"),
    ("model.unique_layers", 10**9, "model.unique_layers: must be an integer in [1, 1024]"),
    ("model.seed", 2**64, "model.seed: must be an integer in [0, 9223372036854775807]"),
    ("workload.new_tokens", 10**12, "workload.new_tokens: must be an integer in [1, 131072]"),
    ("workload.prompt_lengths", [16, 10**12], "workload.prompt_lengths[1]: must be an integer in [1, 131072]"),
    ("workload.repetitions", 10**9, "workload.repetitions: must be an integer in [1, 10000]"),
    ("workload.seed", 10**40, "workload.seed: must be an integer in [0, "),
    ("options.window", 10**9, "options.window: must be an integer in [2, 2050]"),
    ("options.retain_every", 10**9, "options.retain_every: must be an integer in [0, 1024]"),
    ("options.private_layers", 10**9, "options.private_layers: must be an integer in [0, 1024]"),
    ("options.mem_cap", "1e30GiB", "options.mem_cap: must be in [1, 1 PiB] bytes"),
    ("options.mem_cap", 10**30, "options.mem_cap: must be in [1, 1 PiB] bytes, got 1e+30"),
    ("options.timeout_s", 1e300, "options.timeout_s: must be in (0, 86400], got 1e+300"),
    ("options.ratios", [1e300] + [1] * 7, "options.ratios[0]: must be a number in (0, 1e+06]"),
    ("devices.template.cores", 10**30, "devices.template.cores: must be an integer in [1, 1024], got 1e+30"),
    ("devices.template.mem_bytes", 10**30, "devices.template.mem_bytes: must be in [1, 1 PiB] bytes"),
    ("devices.template.speed", 1e300, "devices.template.speed: must be in [0.001, 1000], got 1e+300"),
    ("devices.template.speed", 1e-300, "devices.template.speed: must be in [0.001, 1000]"),
    ("devices.template.disk_read_mbps", 1e300, "devices.template.disk_read_mbps: must be in [0.001, 1e+07] Mbit/s"),
    ("links.latency_ms", 1e300, "links.latency_ms: must be in [0, 60000] ms"),
    ("links.jitter_ms", "1e9s", "links.jitter_ms: must be in [0, 60000] ms"),
    ("links.bandwidth_mbps", 1e-300, "links.bandwidth_mbps: must be in [0.001, 1e+07] Mbit/s"),
    ("links.bandwidth_mbps", "1e30gbps", "links.bandwidth_mbps: must be in [0.001, 1e+07] Mbit/s"),
    ("devices", [{"name": f"d{i}", "cores": 1, "mem_bytes": 2**30} for i in range(1025)],
     "devices: 1025 devices listed; must be at most 1024"),
]


@pytest.mark.parametrize("key,value,expected", EMU_CASES, ids=[f"{k}={v!r}"[:40] for k, v, _ in EMU_CASES])
def test_bad_emulator_field_refused_naming_it(key, value, expected):
    with pytest.raises(TpiError) as e:
        load_run_config("configs/emulate.yaml", [(key, value)])
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("configs/emulate.yaml: "), str(e.value)  # the file, then the field


def test_bounded_field_through_the_emulator_cli(capsys):
    line = one_error(capsys, ["run", "configs/emulate.yaml", "--set", "model.layers=1000000000000000000000000000000"],
                     emulator_cli.main)
    assert line == "error: configs/emulate.yaml: model.layers: must be an integer in [1, 1024], got 1e+30", line


def test_emulator_cli_folders_that_are_files(paths, capsys):
    f = paths["F"]
    assert "--results" in one_error(capsys, ["run", "configs/emulate.yaml", "--results", f], emulator_cli.main)
    assert "--cache-dir" in one_error(capsys, ["run", "configs/emulate.yaml", "--cache-dir", f], emulator_cli.main)
    assert "--results" in one_error(capsys, ["reproduce", "--results", f], emulator_cli.main)
    line = one_error(capsys, ["run", "configs/emulate.yaml", "--set", "options.mem_cap=1e400GiB"], emulator_cli.main)
    assert "options.mem_cap" in line


def test_full_disk_is_one_error_line_and_no_partial_results_line(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    rec = R.record_from_json({
        "experiment": "privacy", "runner": "privacy", "sweep": "s1", "point": {"private_layers": 0},
        "config": {"description": "test", "model": {"vocab": 256}, "latency": {"devices": 3}},
        "recovery": {"nearest": 1.0, "linear": 1.0, "mlp": 1.0}, "ttft_s": 0.02, "token_latency_s": 0.005,
        "error": None, "wall_s": 1.0, "time": "2026-11-28T00:00:00Z"})
    R.append_record(path, rec)
    before = path.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(R.os, "write", full)
    with pytest.raises(TpiError, match="No space left on device") as e:
        R.append_record(path, rec)
    assert str(path) in str(e.value) and path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# A double signal during the emulator's cleanup still cleans up


@pytest.fixture(scope="module")
def emu_cache(tmp_path_factory):
    """The emulator's synthesized model and shards, shared by the signal tests."""
    return tmp_path_factory.mktemp("emu-cache")


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGTERM),
                                     (signal.SIGINT, signal.SIGINT)], ids=["int-term", "term-term", "int-int"])
def test_double_signal_still_cleans_up(tmp_path, emu_cache, signals):
    before = _schedules()
    proc = _cli(tmp_path, emu_cache, config(3, latency_ms=20, clock="wall", new_tokens=50))
    _wait_ready(proc)
    proc.send_signal(signals[0])
    proc.send_signal(signals[1])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 143), err
    assert "Traceback" not in err, err
    assert _ours(str(tmp_path)) == []
    assert _leaked_schedules(before) == []
    assert not (tmp_path / "results" / "t.jsonl").exists()
