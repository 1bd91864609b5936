"""GGUF models: parity with transformers' own GGUF loader, the header parser, config, splits, bad input.

The models are written by tpicore.tools.gguf_synth from tiny synthetic HF checkpoints, into folders of their
own (no tokenizer.json beside them, so transformers reads everything from the GGUF). transformers' loader
dequantizes with the `gguf` package, as we do, so weights are bit-identical and logits agree to float32
rounding. Dimensions are multiples of 256 so every type (K-quants included) applies to every weight.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.runtime.ondemand import OnDemandSource
from tpicore.runtime.session import make_source
from tpicore.tools.gguf_synth import llama3_rope_factors, quantize, write_gguf
from tpicore.tools.synth import presets
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.weights.checkpoint import Checkpoint
from tpicore.weights.gguf import GGUFCheckpoint, read_header, split_files
from tpicore.weights.quant import (
    BLOCK_TAGS,
    GGML_TYPES,
    dequantize,
    hf_row_order,
    llama_cpp_row_order,
)
from tpicore.weights.store import TensorStore

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # puts head_dim 64's frequencies in all three bands
BASE = dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=160, max_pos=256)
VARIANTS = {
    "gqa": {},
    "mha": dict(kv_heads=4),
    "tied": dict(tie=True),
    "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3),
    "headdim": dict(head_dim=32),  # q/o widths 128: not a whole number of 256-element K-quant blocks
    "bias": dict(attention_bias=True, mlp_bias=True),
}
ALL_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
Q4_K_M = {"output.weight": "q6_k", "blk.0.ffn_down.weight": "q6_k", "blk.0.attn_v.weight": "q6_k"}
PROMPT = [1, 17, 42, 99, 5, 130, 64, 23, 8]
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """models(variant, dtype, types=None, split=0) -> path of a GGUF written from the variant's HF folder."""
    hf: dict[str, Path] = {}
    files: dict[tuple, str] = {}

    def get(variant: str = "gqa", dtype: str = "q8_0", types: dict | None = None, split: int = 0) -> str:
        if variant not in hf:
            cfg = presets.llama_config(**{**BASE, **VARIANTS[variant]})
            hf[variant] = write_checkpoint(cfg, tmp_path_factory.mktemp(f"hf-{variant}") / "model")
        key = (variant, dtype, tuple(sorted((types or {}).items())), split)
        if key not in files:
            out = tmp_path_factory.mktemp(f"gguf-{variant}-{dtype}") / "model.gguf"
            files[key] = str(write_gguf(hf[variant], out, dtype, types, split_max_tensors=split)[0])
        return files[key]

    get.hf_dir = lambda variant: str(hf[variant])
    return get


def hf_model(path: str, variant: str):
    """transformers' own GGUF loader (llama3 RoPE given by hand: its loader reads no rope_freqs)."""
    d, f = os.path.split(path)
    cfg = transformers.AutoConfig.from_pretrained(d, gguf_file=f)
    if variant == "llama3":
        cfg.rope_parameters = dict(LLAMA3, rope_theta=500000.0)
    if variant == "bias":  # nor does it set the bias flags from the bias tensors
        cfg.attention_bias = cfg.mlp_bias = True
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, config=cfg, dtype=torch.float32).eval()


def our_generation(path: str, source: str = "resident"):
    store = TensorStore.from_model_dir(path)
    store.check()
    max_seq = len(PROMPT) + NEW_TOKENS
    blocks = {"resident": ResidentSource, "window": lambda s: make_source(s, 2), "ondemand": OnDemandSource}[source]
    dev = Device(store, blocks(store), max_seq)
    try:
        return generate(dev.step, PROMPT, NEW_TOKENS, max_seq=max_seq, keep_logits=True)
    finally:
        dev.close()


def check_against_hf(path: str, variant: str) -> None:
    gen = our_generation(path)
    ref = hf_model(path, variant)
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        fed = PROMPT + gen.tokens[:-1]
        theirs = ref(torch.tensor([fed])).logits[0].numpy()
    ours = np.stack(gen.logits)  # [prompt + new - 1, V]
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert gen.tokens == out[0, len(PROMPT):].tolist()


MATRIX = ([("gqa", t, None) for t in ALL_TYPES]
          + [("mha", "q4_0", None), ("tied", "q4_k", None), ("tied", "bf16", None), ("llama3", "q6_k", None),
             ("llama3", "q8_0", None), ("headdim", "q8_0", None), ("bias", "q5_1", None), ("gqa", "q4_k", Q4_K_M)])


@pytest.mark.parametrize("variant,dtype,types", MATRIX)
def test_logits_and_greedy_match_transformers_gguf_loader(models, variant, dtype, types):
    check_against_hf(models(variant, dtype, types), variant)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_k"])
def test_weights_bit_equal_to_transformers_and_close_to_the_source(models, dtype):
    path = models("gqa", dtype)
    ckpt = GGUFCheckpoint(path)
    state = hf_model(path, "gqa").state_dict()
    source = Checkpoint.from_dir(models.hf_dir("gqa"))
    assert set(ckpt.tensors) == set(source.tensors)
    for name in ckpt.tensors:
        ours = ckpt.get(name)
        assert np.array_equal(ours, state[name].numpy()), name  # the q/k permutation undone exactly
        assert np.abs(ours - source.get(name)).max() < 0.02, name  # and the quantization error is small


def test_split_set_reads_as_the_single_file(models):
    single, first = models("gqa", "q4_k"), models("gqa", "q4_k", split=6)
    parts = split_files(first)
    assert len(parts) >= 3 and parts[0].endswith("-00001-of-%05d.gguf" % len(parts))
    a, b = our_generation(single), our_generation(parts[-1])  # any part names the set
    assert a.tokens == b.tokens and np.array_equal(np.stack(a.logits), np.stack(b.logits))


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_k"])
@pytest.mark.parametrize("source", ["window", "ondemand"])
def test_window_and_ondemand_read_gguf_like_the_resident_path(models, dtype, source):
    """Their block reader reads the quantized bytes, dequantizes row chunks and gathers q/k rows back into HF
    order: bit-identical logits to the resident path (and so to transformers)."""
    path = models("gqa", dtype)
    a, b = our_generation(path), our_generation(path, source)
    assert a.tokens == b.tokens and np.array_equal(np.stack(a.logits), np.stack(b.logits))


# ---- the header parser, against the gguf package's reader ---------------------------------------------


@pytest.mark.parametrize("variant,dtype", [("gqa", "q4_k"), ("llama3", "bf16"), ("tied", "q5_0")])
def test_header_parser_agrees_with_gguf_reader(models, variant, dtype):
    import gguf

    path = models(variant, dtype)
    ours, reader = read_header(path), gguf.GGUFReader(path)
    assert ours.meta == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.dtype, t.shape, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
        for t in reader.tensors]


# ---- quantization and the q/k permutation -------------------------------------------------------------


@pytest.mark.parametrize("tag", BLOCK_TAGS)
def test_blocks_decode_alike_in_gguf_and_transformers_torch_dequantizer(tag):
    """Our K-quant block builder (and gguf's quantizers) write blocks that transformers' independent torch
    dequantizer reads bit-equal to gguf's NumPy one (the one we use), close to the input."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 3.0, (8, 1))).astype(np.float32)
    blocks = quantize(x, tag)  # [8, row_bytes]
    ours = dequantize(blocks, tag)
    ggml = int(GGML_TYPES[tag].ggml)
    if ggml in GGML_BLOCK:
        theirs = torch_dequantize(torch.from_numpy(blocks.reshape(-1)), ggml).numpy().reshape(x.shape)
        assert np.array_equal(ours, theirs)
    bits = GGML_TYPES[tag].bits_per_weight
    assert np.abs(ours - x).max() <= 2.0 ** (4.5 - bits) * np.abs(x).max()


@pytest.mark.parametrize("tag", BLOCK_TAGS)
def test_own_dequantizers_are_bit_equal_to_ggufs(tag):
    """quant.dequantize (our kernels for Q8_0/Q4_0/Q4_K/Q6_K, gguf's for the rest) equals
    gguf.quants.dequantize bit for bit: on quantized data and on random bytes (NaN/inf scales included),
    returned fresh or written into a given (even non-contiguous) output."""
    import gguf

    t = GGML_TYPES[tag]
    rng = np.random.default_rng(1)
    valid = quantize((rng.standard_normal((16, 1024)) * 10.0 ** rng.uniform(-3, 2, (16, 1))).astype(np.float32), tag)
    noise = rng.integers(0, 256, size=(32, 4 * t.block_bytes), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        for raw in (valid, noise, noise[3]):
            ref = gguf.quants.dequantize(raw, t.ggml)
            assert np.array_equal(dequantize(raw, tag), ref, equal_nan=True)
            wide = np.zeros(ref.shape[:-1] + (ref.shape[-1] * 2,), dtype=np.float32)
            dequantize(raw, tag, out=wide[..., ::2])
            assert np.array_equal(wide[..., ::2], ref, equal_nan=True)


def test_row_permutation_round_trips():
    for rows, heads in ((256, 4), (128, 2), (64, 1)):
        to_gguf, back = llama_cpp_row_order(rows, heads), hf_row_order(rows, heads)
        assert np.array_equal(np.arange(rows)[to_gguf][back], np.arange(rows))
        assert not np.array_equal(to_gguf, np.arange(rows))


# ---- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_metadata_matches_config_json(models, variant):
    path = models(variant, "q8_0" if variant == "headdim" else "q4_k")
    ours, ref = GGUFCheckpoint(path).cfg, ModelConfig.from_dir(models.hf_dir(variant))
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    np.testing.assert_allclose(ours.rope_inv_freq, ref.rope_inv_freq, rtol=1e-6, atol=0)
    assert ours.rope_scaling.rope_type == ref.rope_scaling.rope_type


@pytest.mark.parametrize("original_ctx", [8, 64, 2048, 8192, 65536])
def test_llama3_parameters_recovered_from_rope_freqs(original_ctx):
    """Any original context puts 0, 1 or several frequencies in the blended band; all are recovered."""
    cfg = ModelConfig.from_dict({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
                                 "num_attention_heads": 4, "vocab_size": 32, "rope_theta": 500000.0,
                                 "rope_scaling": dict(LLAMA3, original_max_position_embeddings=original_ctx)})
    meta = {"general.architecture": "llama", "llama.embedding_length": 256, "llama.block_count": 1,
            "llama.attention.head_count": 4, "llama.feed_forward_length": 512, "llama.rope.freq_base": 500000.0}
    got = ModelConfig.from_gguf(meta, {"token_embd.weight": (32, 256)}, llama3_rope_factors(cfg), "x.gguf")
    np.testing.assert_allclose(got.rope_inv_freq, cfg.rope_inv_freq, rtol=1e-6, atol=0)


# ---- bad input: one error naming file and tensor/field ------------------------------------------------


def header_bytes(path: str) -> bytearray:
    return bytearray(Path(path).read_bytes())


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return str(p)


def patch_tensor_type(data: bytearray, tensor: str, ggml_type: int) -> bytearray:
    """Rewrite one tensor's ggml type id in the tensor table."""
    at = data.index(tensor.encode()) + len(tensor)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, ggml_type)
    return data


def patch_u32(data: bytearray, key: str, value: int) -> bytearray:
    """Rewrite a uint32 metadata value (key string, type, value)."""
    at = data.index(key.encode()) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUFValueType.UINT32
    struct.pack_into("<I", data, at + 4, value)
    return data


def bad_cases(models, tmp_path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (path, words the one-line error must contain)."""
    good = models("gqa", "q4_k")
    data = header_bytes(good)
    start = read_header(good).tensors
    q = "blk.0.attn_q.weight"
    return {
        "not gguf": (write(tmp_path, b"PK\x03\x04" + bytes(100), "a.gguf"), ("a.gguf", "not a GGUF file")),
        "empty": (write(tmp_path, b"", "e.gguf"), ("e.gguf", "not a GGUF file")),
        "truncated header": (write(tmp_path, data[:2000], "h.gguf"), ("h.gguf", "truncated GGUF header")),
        "truncated data": (write(tmp_path, data[:start[-1].offset + 10], "t.gguf"),
                           ("t.gguf", repr(start[-1].name), "truncated")),
        "unknown type": (write(tmp_path, patch_tensor_type(header_bytes(good), q, 99), "u.gguf"),
                         ("u.gguf", repr(q), "unknown type id 99")),
        "unsupported type": (write(tmp_path, patch_tensor_type(header_bytes(good), q, 10), "q2.gguf"),
                             ("q2.gguf", repr(q), "Q2_K", "not supported")),
        "architecture": (write(tmp_path, header_bytes(good).replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
                                                                     b"\x05\x00\x00\x00\x00\x00\x00\x00qwen2", 1),
                               "arch.gguf"), ("arch.gguf", "general.architecture", "qwen2")),
        "too few layers": (write(tmp_path, patch_u32(header_bytes(good), "llama.block_count", 3), "l3.gguf"),
                           ("l3.gguf", "missing tensor", "blk.2.")),
        "extra layer": (write(tmp_path, patch_u32(header_bytes(good), "llama.block_count", 1), "l1.gguf"),
                        ("l1.gguf", "blk.1.", "beyond llama.block_count")),
        "shape": (write(tmp_path, patch_u32(header_bytes(good), "llama.attention.head_count_kv", 4), "kv.gguf"),
                  ("kv.gguf", "blk.0.attn_k.weight", "has shape [128, 256], expected [256, 256]")),
    }


def test_bad_input_is_one_error_naming_file_and_tensor_or_field(models, tmp_path):
    for name, (path, words) in bad_cases(models, tmp_path).items():
        with pytest.raises(TpiError) as e:
            TensorStore.from_model_dir(path).check()
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), (name, msg)


def test_split_set_errors_name_the_part(models, tmp_path):
    parts = split_files(models("gqa", "q8_0", split=6))
    os.rename(parts[1], parts[1] + ".moved")
    try:
        with pytest.raises(TpiError, match=r"-00002-of-.*missing"):
            TensorStore.from_model_dir(parts[0])
    finally:
        os.rename(parts[1] + ".moved", parts[1])
    data = header_bytes(parts[0])
    at = data.index(b"split.tensors.count") + len("split.tensors.count")
    struct.pack_into("<i", data, at + 4, 999)
    bad = tmp_path / os.path.basename(parts[0])
    bad.write_bytes(bytes(data))
    for p in parts[1:]:
        os.symlink(p, tmp_path / os.path.basename(p))
    with pytest.raises(TpiError, match="split.tensors.count: 999 tensors announced"):
        TensorStore.from_model_dir(str(bad))


def run_tpi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpicore", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_cli_generates_from_a_gguf_and_rejects_bad_ones(models, tmp_path):
    path = models("llama3", "q4_k")
    r = run_tpi("generate", "--model", path, "--prompt", "Hello world", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["tokens"]) == 6 and report["prompt_tokens"] > 1
    r = run_tpi("generate", "--model", path, "--prompt", "Hi", "--chat", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    bad = write(tmp_path, header_bytes(path)[:3000], "cut.gguf")
    r = run_tpi("generate", "--model", bad, "--prompt-ids", "1,2,3")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cut.gguf" in lines[0], r.stderr
