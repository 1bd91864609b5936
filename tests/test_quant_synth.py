"""`tpi synth` with ggml types: a GGUF file straight from random weights, and quantized shard folders."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest

from tpicore.cli import main
from tpicore.errors import TpiError
from tpicore.tools.gguf_synth import write_gguf
from tpicore.tools.shard import shard_checkpoint
from tpicore.tools.synth import presets
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.gguf import write_synthetic_gguf
from tpicore.tools.synth.unique import write_unique_shards
from tpicore.weights.store import TensorStore

CONFIG = presets.llama_config(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=160, max_pos=256)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_k", "bf16"])
def test_synthetic_gguf_equals_converting_the_f32_checkpoint(tmp_path, dtype):
    direct = write_synthetic_gguf(dict(CONFIG), tmp_path / "direct.gguf", dtype, seed=3)
    hf = write_checkpoint(dict(CONFIG), tmp_path / "direct", dtype="f32", seed=3)  # general.name: the folder's
    (tmp_path / "conv").mkdir()
    converted = write_gguf(hf, tmp_path / "conv" / "direct.gguf", dtype)
    assert filecmp.cmp(direct[0], converted[0], shallow=False)


@pytest.mark.parametrize("dtype", ["q4_k", "q8_0"])
def test_quantized_synth_shards_equal_sharding_the_synthetic_gguf(tmp_path, dtype):
    gguf = write_synthetic_gguf(dict(CONFIG), tmp_path / "m.gguf", dtype)[0]
    sharded = shard_checkpoint(str(gguf), str(tmp_path / "sh"), 3, [3, 2, 1], quiet=True)
    synth = write_unique_shards(dict(CONFIG), str(tmp_path / "u"), 3, 2, dtype, ratios=[3, 2, 1])
    for a, b in zip(sharded, synth):
        sa, sb = TensorStore.from_shard_dir(a), TensorStore.from_shard_dir(b)
        assert set(sa.ckpt.tensors) == set(sb.ckpt.tensors)
        for name, info in sa.ckpt.tensors.items():
            other = sb.ckpt.info(name)
            assert (info.dtype, info.shape) == (other.dtype, other.shape), name
            assert np.array_equal(sa.ckpt.get(name), sb.ckpt.get(name)), name


def test_unique_layers_70b_shape_quantized_rank_bytes(tmp_path):
    """One worker of a Llama 2-70B shape over 8 devices, 1 stored layer: its quantized bytes per layer."""
    cfg = presets.preset_config("llama-2-70b")
    d = write_unique_shards(cfg, str(tmp_path / "u"), 8, 1, "q4_k", ranks=[3])[0]
    man = json.loads(open(f"{d}/manifest.json").read())
    layer = [t for n, t in man["tensors"].items() if n.startswith("model.layers.0.") and len(t["shape"]) == 2]
    elems = sum(np.prod(t["shape"]) for t in layer)
    assert {t["dtype"] for t in layer} == {"Q4_K"}  # 8-way cuts of 8192 and 28672 fall on 256-element blocks
    assert sum(t["nbytes"] for t in layer) == elems * 144 // 256


def test_cli_synth_formats_and_errors(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONFIG))
    assert main(["synth", str(path), "--out", str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "q6_k"]) == 0
    assert "bits per weight" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]) == 0
    assert main(["synth", str(path), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["synth", str(path), "--out", str(tmp_path / "x"), "--dtype", "q4_0"]) == 2
    assert "--format gguf, or --devices N" in capsys.readouterr().err
    with pytest.raises(TpiError, match="not a whole number of Q4_K blocks"):
        write_synthetic_gguf(presets.preset_config("tiny"), tmp_path / "t.gguf", "q4_k")
