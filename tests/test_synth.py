"""tpicore.tools.synth: preset shapes, checkpoints HF can load, dtypes, sharding, streaming memory, CLI errors."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpicore.errors import TpiError
from tpicore.tools.synth import checkpoint, init, presets, tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_PRESETS = ["tiny", "tiny-mha", "tiny-llama3", "tiny-headdim", "tiny-bias", "tiny-tied"]

# The TPI-LLM paper's models (arXiv 2410.00531, as in paper_tables.yaml): written out here on purpose,
# so a typo in the presets cannot be copied into the check.
PAPER_SHAPES = {  # hidden, layers, heads, kv_heads, ffn, vocab
    "llama-2-3b": (3200, 26, 32, 32, 8640, 32000),
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": (5120, 40, 40, 40, 13824, 32000),
    "llama-2-70b": (8192, 80, 64, 8, 28672, 32000),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama-3.1-70b": (8192, 80, 64, 8, 28672, 128256),
    "yi-34b": (7168, 60, 56, 8, 20480, 64000),
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000),
}


def shape_of(cfg: dict) -> tuple:
    return (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"])


@pytest.mark.parametrize("name", list(PAPER_SHAPES))
def test_paper_presets_have_true_shapes(name):
    cfg = presets.preset_config(name)
    assert shape_of(cfg) == PAPER_SHAPES[name]
    assert cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["hidden_act"] == "silu" and not cfg["tie_word_embeddings"]
    if name.startswith("llama-3.1"):
        assert cfg["rope_theta"] == 500000.0 and cfg["max_position_embeddings"] == 131072
        assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, [128001, 128008, 128009])  # as Meta's
    else:
        assert cfg["rope_scaling"] is None
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
        want_theta = 5000000.0 if name == "yi-34b" else 10000.0
        assert cfg["rope_theta"] == want_theta
        if name.startswith("llama-2") or name == "yi-34b":
            assert cfg["max_position_embeddings"] == 4096


def test_preset_params_and_copies():
    assert 6.7e9 < checkpoint.param_count(presets.preset_config("llama-2-7b")) < 6.8e9
    assert 8.0e9 < checkpoint.param_count(presets.preset_config("llama-3.1-8b")) < 8.1e9
    assert 68e9 < checkpoint.param_count(presets.preset_config("llama-2-70b")) < 70e9
    assert 1.0e9 < checkpoint.param_count(presets.preset_config("tinyllama-1.1b")) < 1.2e9
    assert 0.08e9 < checkpoint.param_count(presets.preset_config("small-100m")) < 0.15e9
    cfg = presets.preset_config("tiny")
    cfg["num_hidden_layers"] = 99
    assert presets.preset_config("tiny")["num_hidden_layers"] == 3  # callers get copies
    with pytest.raises(TpiError, match="unknown preset 'nope'.*tiny"):
        presets.preset_config("nope")


def test_tiny_presets_cover_the_edge_cases():
    p = presets.PRESETS
    assert p["tiny"]["vocab_size"] == 131 and p["tiny"]["num_key_value_heads"] < p["tiny"]["num_attention_heads"]
    assert p["tiny-mha"]["num_key_value_heads"] == p["tiny-mha"]["num_attention_heads"]
    assert p["tiny-llama3"]["rope_scaling"]["rope_type"] == "llama3"
    assert p["tiny-headdim"]["head_dim"] != p["tiny-headdim"]["hidden_size"] // p["tiny-headdim"]["num_attention_heads"]
    assert p["tiny-bias"]["attention_bias"] and p["tiny-bias"]["mlp_bias"]
    assert p["tiny-tied"]["tie_word_embeddings"]
    names = [n for n, _ in checkpoint.checkpoint_tensors(p["tiny-bias"])]
    assert "model.layers.1.self_attn.o_proj.bias" in names and "model.layers.0.mlp.down_proj.bias" in names
    assert "lm_head.weight" not in [n for n, _ in checkpoint.checkpoint_tensors(p["tiny-tied"])]
    assert dict(checkpoint.checkpoint_tensors(p["tiny-headdim"]))["model.layers.0.self_attn.o_proj.weight"] == (48, 64)


@pytest.mark.parametrize("style,vocab", sorted({(tokenizer.tokenizer_style(c), c["vocab_size"])
                                                for c in presets.PRESETS.values()}))
def test_tokenizer_vocab_equals_config_vocab(style, vocab):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.build_tokenizer_json(style, vocab))
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    cfg = next(c for c in presets.PRESETS.values() if c["vocab_size"] == vocab and tokenizer.tokenizer_style(c) == style)
    assert tok.encode("hi").ids[0] == cfg["bos_token_id"]
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    want = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"] if style == "llama3" else ["</s>"]
    assert [tok.id_to_token(i) for i in eos] == want
    text = "The quick brown fox, 42 times.\n"
    assert tok.decode(tok.encode(text).ids) == text


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {name: checkpoint.write_checkpoint(presets.preset_config(name), root / name, seed=1) for name in TINY_PRESETS}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_checkpoint_loads_in_transformers(tiny_dirs, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    d = tiny_dirs[name]
    assert sorted(p.name for p in d.iterdir()) == ["checksums.json", "config.json", "generation_config.json",
                                                  "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model, info = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"] == model.config.vocab_size
    assert tok.bos_token_id == cfg["bos_token_id"]
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there, how are you?"}],
                                     tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt)])).logits[0].numpy()
    assert np.isfinite(logits).all()
    assert logits.std(axis=-1).min() > 0.3  # not flat over the vocabulary...
    assert np.abs(np.diff(logits, axis=0)).mean() > 0.1  # ...and depends on the token/position
    if name == "tiny-tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_deep_model_stays_in_range(tmp_path):
    """22 layers (TinyLlama's depth) at two widths: the residual grows slowly and logits stay informative."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for hidden, heads in ((48, 4), (256, 8)):
        cfg = presets.llama_config(hidden=hidden, layers=22, heads=heads, kv_heads=heads // 4, ffn=hidden * 3,
                                 vocab=131, max_pos=256)
        d = checkpoint.write_checkpoint(cfg, tmp_path / f"deep{hidden}", dtype="bf16")
        model = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        ids = torch.tensor([list(range(3, 60))])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        rms = [float(h.pow(2).mean().sqrt()) for h in out.hidden_states[:-1]]  # residual stream per layer
        assert all(math.isfinite(r) for r in rms)
        assert rms[-1] < 4 * math.sqrt(22), rms  # ~sqrt(layers) growth, far from exponential
        assert rms[-1] > rms[1]
        logits = out.logits[0].numpy()
        assert np.isfinite(logits).all() and 0.3 < logits.std() < 10


@pytest.mark.parametrize("dtype,np_name", [("f32", "float32"), ("f16", "float16"), ("bf16", "bfloat16")])
def test_dtypes_written_and_deterministic(tmp_path, dtype, np_name):
    import ml_dtypes  # noqa: F401  (lets safetensors.numpy hand out bfloat16)
    from safetensors.numpy import load_file

    cfg = presets.preset_config("tiny-bias")
    d = checkpoint.write_checkpoint(cfg, tmp_path / dtype, dtype=dtype, seed=7)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == {"f32": "float32", "f16": "float16",
                                                                          "bf16": "bfloat16"}[dtype]
    path = d / "model.safetensors"
    header, data_start = read_safetensors_header(path)
    assert data_start % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    end = 0
    for name, shape in checkpoint.checkpoint_tensors(cfg):  # contiguous, in file order, sizes from shapes
        info = header[name]
        assert info["shape"] == list(shape) and info["data_offsets"][0] == end
        end = info["data_offsets"][1]
        assert info["dtype"] == init.DTYPES[dtype][0]
    assert path.stat().st_size == data_start + end
    tensors = load_file(str(path))
    for name, shape in checkpoint.checkpoint_tensors(cfg):
        want = init.generate_tensor(name, shape, seed=7)  # the f32 values, rounded to nearest even
        got = tensors[name]
        assert got.dtype.name == np_name and got.shape == shape
        np.testing.assert_array_equal(got, want.astype(got.dtype))
    again = checkpoint.write_checkpoint(cfg, tmp_path / (dtype + "-again"), dtype=dtype, seed=7)
    assert (again / "model.safetensors").read_bytes() == path.read_bytes()
    other = checkpoint.write_checkpoint(cfg, tmp_path / (dtype + "-seed8"), dtype=dtype, seed=8)
    assert (other / "model.safetensors").read_bytes() != path.read_bytes()


def test_init_scales():
    emb = init.generate_tensor("model.embed_tokens.weight", (500, 400))
    assert abs(emb.std() * math.sqrt(400) - 1) < 0.02 and abs(emb.mean()) < 0.01
    norm = init.generate_tensor("model.layers.0.input_layernorm.weight", (4000,))
    assert abs(norm.mean() - 1) < 0.01 and abs(norm.std() - 0.1) < 0.01


def test_sharded_checkpoint_and_index(tmp_path):
    from safetensors.numpy import load_file

    cfg = presets.preset_config("tiny")
    whole = load_file(str(checkpoint.write_checkpoint(cfg, tmp_path / "one") / "model.safetensors"))
    d = checkpoint.write_checkpoint(cfg, tmp_path / "three", num_shards=3)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in whole.values())
    seen = {}
    for f in files:
        part = load_file(str(d / f))
        assert all(index["weight_map"][k] == f for k in part)
        seen.update(part)
    assert seen.keys() == whole.keys()
    for k in whole:
        np.testing.assert_array_equal(seen[k], whole[k])  # sharding does not change any value
    # cutting at a byte budget: every file but the last tensor-by-tensor within it
    budget = 40_000
    d = checkpoint.write_checkpoint(cfg, tmp_path / "budget", max_shard_bytes=budget)
    sizes = [sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in read_safetensors_header(p)[0].items()
                 if k != "__metadata__") for p in sorted(d.glob("*.safetensors"))]
    assert len(sizes) > 3 and all(s <= budget for s in sizes)


def test_sharded_checkpoint_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d1 = checkpoint.write_checkpoint(presets.preset_config("tiny-llama3"), tmp_path / "one", dtype="f16")
    d4 = checkpoint.write_checkpoint(presets.preset_config("tiny-llama3"), tmp_path / "four", dtype="f16", num_shards=4)
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    out = []
    for d in (d1, d4):
        model = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        with torch.no_grad():
            out.append(model(ids).logits)
    assert torch.equal(out[0], out[1])


def test_layer_override_keeps_layer_weights(tmp_path):
    from safetensors.numpy import load_file

    cfg = presets.preset_config("tiny")
    full = load_file(str(checkpoint.write_checkpoint(cfg, tmp_path / "full") / "model.safetensors"))
    cfg["num_hidden_layers"] = 1
    one = load_file(str(checkpoint.write_checkpoint(cfg, tmp_path / "one") / "model.safetensors"))
    assert set(one) < set(full) and not any(k.startswith("model.layers.1.") for k in one)
    for k in one:
        np.testing.assert_array_equal(one[k], full[k])


def test_peak_memory_is_far_below_checkpoint_size(tmp_path):
    """Write a ~330 MB checkpoint in a fresh process; its peak RSS must stay under a third of that."""
    cfg = presets.llama_config(hidden=1024, layers=5, heads=8, kv_heads=8, ffn=4096, vocab=131, max_pos=256)
    weight_bytes = checkpoint.param_count(cfg) * 4
    assert 300e6 < weight_bytes < 400e6
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of this (torch-sized)
    # pytest process would report the parent's footprint.
    code = ("import json, re, sys\n"
            "from tpicore.tools.synth.checkpoint import write_checkpoint\n"
            "write_checkpoint(json.loads(sys.argv[1]), sys.argv[2], progress=False)\n"
            "status = open('/proc/self/status').read()\n"
            "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg), str(tmp_path / "big")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak_rss_bytes = int(proc.stdout.split()[-1])
    assert (tmp_path / "big" / "model.safetensors").stat().st_size > weight_bytes
    assert peak_rss_bytes < weight_bytes / 3, f"peak RSS {peak_rss_bytes / 2**20:.0f} MiB"


def listing(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_existing_output_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = listing(out)
    with pytest.raises(TpiError, match=r"out: exists and is not empty \(pass --force"):
        checkpoint.write_checkpoint(presets.preset_config("tiny"), out)
    with pytest.raises(TpiError, match="holds no config.json; refusing"):  # --force only replaces checkpoints
        checkpoint.write_checkpoint(presets.preset_config("tiny"), out, force=True)
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left

    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint.write_checkpoint(presets.preset_config("tiny"), empty)  # an empty folder is fine
    old = listing(empty)
    checkpoint.write_checkpoint(presets.preset_config("tiny"), empty, seed=3, force=True)
    assert listing(empty).keys() == old.keys() and listing(empty) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]
    assert oct(empty.stat().st_mode & 0o777) == oct(0o755)


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, tensors, dtype, seed, progress):
        calls.append(path)
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_safetensors", failing_write)
    with pytest.raises(OSError):
        checkpoint.write_checkpoint(presets.preset_config("tiny"), tmp_path / "out")
    assert calls and list(tmp_path.iterdir()) == []


def test_config_file_as_arch(tmp_path):
    # transformers-5 style keys: dtype + rope_parameters
    src = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200, "dtype": "bfloat16",
           "max_position_embeddings": 512, "tie_word_embeddings": True,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    (tmp_path / "config.json").write_text(json.dumps(src))
    for arch in (tmp_path / "config.json", tmp_path):
        cfg = presets.resolve_arch(str(arch))
        assert shape_of(cfg) == (64, 2, 4, 2, 96, 200) and cfg["tie_word_embeddings"]
        assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
        assert cfg["rope_scaling"]["original_max_position_embeddings"] == 64 and "rope_theta" not in cfg["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps({**src, "model_type": "mistral"}))
    with pytest.raises(TpiError, match="model_type is 'mistral', expected 'llama'"):
        presets.resolve_arch(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**src, "num_key_value_heads": 3}))
    with pytest.raises(TpiError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        presets.resolve_arch(str(tmp_path))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpicore", "synth", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_bad_arch_is_one_error_line(tmp_path):
    proc = run_cli("nope", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown ARCH 'nope'")
    assert "llama-2-7b" in lines[0] and "tiny-llama3" in lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_writes_overrides(tmp_path):
    out = tmp_path / "m"
    proc = run_cli("tiny-llama3", "--out", str(out), "--layers", "1", "--dtype", "bf16", "--seed", "5",
                   "--max-shard-bytes", "20KB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}:")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["torch_dtype"] == "bfloat16"
    assert (out / "model.safetensors.index.json").exists()
    proc = run_cli("tiny", "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--force" in proc.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1  # untouched
