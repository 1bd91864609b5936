"""`tpi plan` / the predictor with quantized weights: bits per weight per tensor, dequantization in tau."""

from __future__ import annotations

import json

import pytest

from tpicore.cli import main
from tpicore.model.config import ModelConfig
from tpicore.tools.gguf_synth import write_gguf
from tpicore.tools.predictor import STORED_BYTES, StoredWeights, load_source, predict
from tpicore.tools.shard import shard_checkpoint
from tpicore.tools.synth import presets
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config


def test_bits_per_weight_of_the_ggml_types():
    assert STORED_BYTES["q8_0"] == 34 / 32 and STORED_BYTES["Q4_K"] == 144 / 256 and STORED_BYTES["q6_k"] == 210 / 256
    assert STORED_BYTES["f32"] == 4 and STORED_BYTES["BF16"] == 2
    mixed = StoredWeights.of_tensors([("Q4_K", (256, 256), 256 * 144), ("Q6_K", (256, 256), 256 * 210)])
    assert mixed.bytes_per_weight == pytest.approx((144 + 210) / 512)
    rates = sorted(StoredWeights.of_dtype(t).dequant_elems_per_s for t in ("q4_k", "q6_k"))
    assert rates[0] < mixed.dequant_elems_per_s < rates[1]  # the elements-weighted harmonic mean


def test_quantized_loads_read_fewer_bytes_and_pay_for_dequantization():
    cfg = ModelConfig.from_dict(preset_config("llama-2-70b"))
    f32 = predict(cfg, 8, 2, stored_bytes=4, disk_gbps=2)[1]
    q4 = predict(cfg, 8, 2, stored_bytes=STORED_BYTES["q4_k"], disk_gbps=2)[1]
    q4_dq = predict(cfg, 8, 2, stored_bytes=STORED_BYTES["q4_k"], disk_gbps=2, dequant_elems_per_s=100e6)[1]
    assert q4.tau_ffn_s == pytest.approx(f32.tau_ffn_s * 0.5625 / 4)
    elems = f32.ffn_mb * 1e6 / 4
    assert q4_dq.tau_ffn_s == pytest.approx(q4.tau_ffn_s + elems / 100e6)


def test_plan_reads_a_gguf_and_its_shards(tmp_path, capsys):
    hf = write_checkpoint(presets.llama_config(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=160),
                          tmp_path / "hf")
    path = str(write_gguf(hf, tmp_path / "m.gguf", "q8_0")[0])
    config, stored, _, _ = load_source(path, None)
    assert config["hidden_size"] == 256 and stored.bytes_per_weight == pytest.approx(34 / 32)
    shard_checkpoint(path, str(tmp_path / "sh"), 2, quiet=True)
    assert main(["plan", "--model", str(tmp_path / "sh"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["devices"] == 2 and rep["stored_bytes_per_weight"] == pytest.approx(34 / 32, abs=1e-4)
    assert rep["dequant_elems_per_s"] > 0
    assert main(["plan", "--preset", "llama-2-70b", "--devices", "8", "--dtype", "q4_k"]) == 0
    assert "0.5625 bytes each, dequantized at" in capsys.readouterr().out
