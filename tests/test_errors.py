"""Bad input: one clear error line naming the file/field, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

from tpicore.cli import main
from tpicore.comm.frame import Kind
from tpicore.comm.local import local_groups
from tpicore.dist.tensor_parallel import worker_loop
from tpicore.errors import TpiError
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.report import RankReport, TimeSplit, TraceEvent
from tpicore.runtime.window_stats import BlockStats, Stall, StepStats, WindowStats
from tpicore.weights.store import TensorStore


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_copy(hf_models, tmp_path):
    src, _ = hf_models("gqa")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def gen(capsys, model_dir, *extra):
    return run_cli(capsys, "generate", "--model", str(model_dir), "--prompt-ids", "1,2,3",
                   "--max-new-tokens", "3", *extra)


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_good_run_prints_ids(capsys, model_copy):
    code, out, err = gen(capsys, model_copy, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["tokens"]) == 3 and rep["peak_rss_bytes"] > 0 and rep["ttft_s"] > 0


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.pop("hidden_size"), "missing required field 'hidden_size'"),
    (lambda c: c.update(model_type="gpt2"), "model_type: unsupported 'gpt2'"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: (c.pop("rope_parameters", None), c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
     "rope_type: unsupported 'yarn'"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "rope_type: unsupported 'dynamic'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(vocab_size=-5), "vocab_size"),
])
def test_bad_config_field_is_named(capsys, model_copy, mutate, needle):
    path = model_copy / "config.json"
    cfg = json.loads(path.read_text())
    mutate(cfg)
    path.write_text(json.dumps(cfg))
    code, out, err = gen(capsys, model_copy)
    line = one_error_line(err)
    assert code == 2 and needle in line and "config.json" in line


def test_config_not_json(capsys, model_copy):
    (model_copy / "config.json").write_text("{not json")
    code, _, err = gen(capsys, model_copy)
    assert code == 2 and "config.json: not valid JSON" in one_error_line(err)


def safetensors_file(d):
    return d / "model.safetensors"


def test_truncated_safetensors_names_file_and_tensor(capsys, model_copy):
    f = safetensors_file(model_copy)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    code, _, err = gen(capsys, model_copy)
    line = one_error_line(err)
    assert code == 2 and "model.safetensors" in line and "truncated" in line and "tensor '" in line


def test_corrupt_header(capsys, model_copy):
    f = safetensors_file(model_copy)
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    code, _, err = gen(capsys, model_copy)
    assert code == 2 and "corrupt safetensors header" in one_error_line(err)


def rewrite_header(f, edit):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    # keep the data offsets valid: data starts right after the new header
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_missing_tensor_is_named(capsys, model_copy):
    rewrite_header(safetensors_file(model_copy), lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    code, _, err = gen(capsys, model_copy)
    line = one_error_line(err)
    assert code == 2 and "missing tensor 'model.layers.1.mlp.up_proj.weight'" in line


def test_shape_mismatch_is_named(capsys, model_copy):
    def edit(h):
        t = h["model.layers.0.self_attn.k_proj.weight"]
        t["shape"] = [t["shape"][1], t["shape"][0]]  # same byte size, wrong shape

    rewrite_header(safetensors_file(model_copy), edit)
    code, _, err = gen(capsys, model_copy)
    line = one_error_line(err)
    assert code == 2 and "'model.layers.0.self_attn.k_proj.weight' has shape" in line and "model.safetensors" in line


def test_no_checkpoint(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    code, _, err = gen(capsys, tmp_path)
    assert code == 2 and "config.json" in one_error_line(err)


def test_context_too_long(capsys, model_copy):
    code, _, err = run_cli(capsys, "generate", "--model", str(model_copy), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "500")
    assert code == 2 and "max_position_embeddings" in one_error_line(err)


def test_bad_prompt_ids(capsys, model_copy):
    code, _, err = run_cli(capsys, "generate", "--model", str(model_copy), "--prompt-ids", "1,x")
    assert code == 2 and "--prompt-ids" in one_error_line(err)
    code, _, err = run_cli(capsys, "generate", "--model", str(model_copy), "--prompt-ids", "1,9999")
    assert code == 2 and "outside the vocabulary" in one_error_line(err)


def test_bad_sampling_values(capsys, model_copy):
    code, _, err = gen(capsys, model_copy, "--top-p", "0")
    assert code == 2 and "--top-p" in one_error_line(err)


def test_dump_logits_rows_and_atomic(capsys, model_copy, tmp_path):
    out = tmp_path / "logits.npy"
    code, _, err = gen(capsys, model_copy, "--dump-logits", str(out))
    assert code == 0, err
    arr = np.load(out)
    assert arr.shape == (3 + 3 - 1, 131) and arr.dtype == np.float32
    # a failing run leaves an existing file alone and no temp files behind
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "generate", "--model", str(model_copy), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "500", "--dump-logits", str(out))
    assert code == 2 and out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["logits.npy", "m"]


def test_dump_logits_missing_folder(capsys, model_copy, tmp_path):
    code, _, err = gen(capsys, model_copy, "--dump-logits", str(tmp_path / "nope" / "x.npy"))
    assert code == 2 and "--dump-logits" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# What crosses the control channel: a worker validates the master's options, the master a report


@pytest.mark.parametrize("options,needle", [
    ({"read_delay_s": 1.0}, "options: read_delay_s: unknown key"),  # test hooks are local only, never on the wire
    ({"max_seq": 0}, "options: max_seq: must be an integer >= 1, got 0"),
    ({"max_seq": 10**9}, "options.max_seq: must be <= 129"),  # bounded by the model's context
    ({"allreduce": "mesh"}, "options: allreduce: expected one of star, ring, tree"),
    ({"window": 1}, "options: window: must be an integer >= 2, got 1"),
    ({"trace": "yes"}, "options: trace: expected true or false"),
    (None, "options: expected a mapping"),
])
def test_worker_refuses_bad_run_options(hf_models, options, needle):
    model_dir, _ = hf_models("gqa")  # max_position_embeddings 128
    master, worker = local_groups(2, timeout_s=5.0)
    try:
        master.channel(1).send_json(Kind.CONTROL, {"op": "setup", "options": options})
        with pytest.raises(TpiError, match=re.escape(needle)) as info:
            worker_loop(worker, TensorStore.from_model_dir(model_dir), DeviceEnv())
        assert str(info.value).startswith("rank 1: setup from rank 0")
    finally:
        master.close()
        worker.close()


def test_rank_report_json_round_trip_and_malformed():
    window = WindowStats(2, 0, 3, steps=[StepStats(0, 0.1, 0.2, 0.3, 0.7, 0.05, 0.14)],
                         blocks={"attn": BlockStats(3, 1.0, 0.5, 0.1, 2.0, 0.02)}, first_stall=Stall(0, "ffn1", 0.01))
    rep = RankReport(1, 10, 2, {"peak_rss_bytes": 10, "page_cache_bytes": 2}, TimeSplit(1.0, 2.0, loads=3),
                     window, [TraceEvent("attn0", "compute", 0.5, 0.25)])
    wire = json.loads(json.dumps(rep.to_json()))
    assert RankReport.from_json(wire) == rep
    assert set(wire) == {"rank", "peak_rss_bytes", "page_cache_bytes", "memory", "time_split", "window", "trace"}
    with pytest.raises(TpiError, match="rank 1 sent a malformed report"):
        RankReport.from_json({**wire, "time_split": {"compute_s": 1.0, "bogus": 2}}, "rank 1")
