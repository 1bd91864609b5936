"""The lean one-token decode path (model.llama with a DecodeScratch) gives the general path's bits.

Block by block on random weights (biases or not, GQA groups of 1..3, several positions, a split share),
the norm's scalar arithmetic on many rows, and a whole Device decode (lean) against the reference
`forward` (general path) on a synthetic checkpoint: every comparison is exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from tpicore.model import llama as M
from tpicore.model.config import ModelConfig
from tpicore.runtime.device import Device, ResidentSource
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config
from tpicore.weights.store import TensorStore


def make_cfg(H: int, Hkv: int, D: int, F: int, Dh: int = 16) -> ModelConfig:
    return ModelConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=H,
                       num_key_value_heads=Hkv, head_dim=Dh, vocab_size=32, max_position_embeddings=64,
                       rms_norm_eps=1e-5, rope_theta=1e4)


def layer_weights(rng: np.random.Generator, cfg: ModelConfig, Hl: int, Hkvl: int, Fl: int,
                  bias: bool) -> dict[str, np.ndarray]:
    D, Dh = cfg.hidden_size, cfg.head_dim

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.2)

    w = {"input_layernorm.weight": r(D) + 1, "post_attention_layernorm.weight": r(D) + 1,
         "self_attn.q_proj.weight": r(Hl * Dh, D), "self_attn.k_proj.weight": r(Hkvl * Dh, D),
         "self_attn.v_proj.weight": r(Hkvl * Dh, D), "self_attn.o_proj.weight": r(D, Hl * Dh),
         "mlp.gate_proj.weight": r(Fl, D), "mlp.up_proj.weight": r(Fl, D), "mlp.down_proj.weight": r(D, Fl)}
    if bias:
        w |= {"self_attn.q_proj.bias": r(Hl * Dh), "self_attn.k_proj.bias": r(Hkvl * Dh),
              "self_attn.v_proj.bias": r(Hkvl * Dh), "self_attn.o_proj.bias": r(D),
              "mlp.gate_proj.bias": r(Fl), "mlp.up_proj.bias": r(Fl), "mlp.down_proj.bias": r(D)}
    return w


@pytest.mark.parametrize("D", [7, 64, 576, 768, 1000])
def test_norm_row_matches_the_general_norm(D):
    rng = np.random.default_rng(D)
    s = M.DecodeScratch(D)
    for scale in (1e-3, 1.0, 37.0, 1e4):
        w = rng.standard_normal(D, dtype=np.float32)
        for _ in range(50):
            x = rng.standard_normal((1, D), dtype=np.float32) * np.float32(scale)
            assert np.array_equal(M.rms_norm_row(x[0], w, 1e-5, s), M.rms_norm(x, w, 1e-5)[0])


@pytest.mark.parametrize("H,Hkv,Hl,Hkvl,bias", [(4, 4, 4, 4, False), (6, 2, 6, 2, True), (6, 2, 3, 1, False),
                                                (4, 1, 2, 1, True)])
def test_lean_blocks_match_the_general_blocks(H, Hkv, Hl, Hkvl, bias):
    cfg = make_cfg(H, Hkv, D=48, F=40)
    rng = np.random.default_rng(H * 10 + Hl)
    w = layer_weights(rng, cfg, Hl, Hkvl, Fl=24, bias=bias)
    rope = M.Rope()
    kv_ref, kv_lean = M.KVCache(Hkvl, 16, cfg.head_dim, rope), M.KVCache(Hkvl, 16, cfg.head_dim, rope)
    prompt = rng.standard_normal((5, cfg.hidden_size), dtype=np.float32)
    for kv in (kv_ref, kv_lean):  # the same prefill (general path) into both caches
        M.attn_block(prompt.copy(), w, cfg, kv, 0, M.identity)
    scratch = M.DecodeScratch(cfg.hidden_size)
    x = rng.standard_normal((1, cfg.hidden_size), dtype=np.float32)
    for pos in range(5, 12):
        ref = M.ffn_block(M.attn_block(x.copy(), w, cfg, kv_ref, pos, M.identity), w, cfg, M.identity)
        h = M.attn_block(x.copy(), w, cfg, kv_lean, pos, M.identity, scratch)
        lean = M.ffn_block(h, w, cfg, M.identity, scratch)
        assert lean is not h and lean.shape == (1, cfg.hidden_size)
        assert np.array_equal(lean, ref), pos
        assert np.array_equal(kv_lean.k, kv_ref.k) and np.array_equal(kv_lean.v, kv_ref.v)
        x = ref * np.float32(0.5)


def test_device_decode_matches_the_general_path(tmp_path):
    """Device.step (lean layers for one token) against the general blocks on the same weights; both end in
    the Device's own chunked LM head, which is not what is compared here."""
    model = write_checkpoint(preset_config("tiny"), tmp_path / "tiny", progress=False)
    store = TensorStore.from_model_dir(str(model))
    cfg, L = store.cfg, store.cfg.num_hidden_layers
    dev = Device(store, ResidentSource(store), max_seq=24)
    layers = [{leaf: store.load(name) for kind in ("attn", "ffn") for leaf, name in store.leaves((kind, i)).items()}
              for i in range(L)]
    caches = [M.KVCache(cfg.num_key_value_heads, 24, cfg.head_dim) for _ in range(L)]

    def general(ids: np.ndarray, pos: int) -> np.ndarray:
        x = dev.embed(ids)  # [T] -> [T, D]
        for w, kv in zip(layers, caches):
            x = M.block(x, w, cfg, kv, pos, M.identity)
        return dev.head(x[-1:])  # [1, V]

    prompt = np.arange(3, 9, dtype=np.int64)
    want = general(prompt, 0)
    assert np.array_equal(dev.step(prompt, 0), want)  # prefill: the general path on both sides
    pos, tok = len(prompt), int(np.argmax(want[-1]))
    for _ in range(8):
        ids = np.asarray([tok], dtype=np.int64)
        got, want = dev.step(ids, pos), general(ids, pos)
        assert np.array_equal(got, want), pos
        pos, tok = pos + 1, int(np.argmax(want[-1]))
