"""The balanced placement (`--ratios balanced`) and the lean decode step's fused elementwise work.

Balanced ratios equalise each rank's weight bytes per step (the master's LM head included) and stay a
plain ratio list (so manifests recompute the same layouts); 'equal' parses as equal shares. The lean
step's norm, RoPE, softmax and SiLU-gate give the bits of the plain formulas they replace.
"""

from __future__ import annotations

import numpy as np
import pytest

from tpicore.dist.session import DEFAULT_PLACEMENT, plan_ratios
from tpicore.model import llama as M
from tpicore.model.config import ModelConfig
from tpicore.model.split import balanced_ratios, parse_ratios, split_layouts, step_bytes
from tpicore.runtime.session import GenerateOptions

M125 = ModelConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, rope_theta=1e4)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_balanced_ratios_equalise_bytes_per_step(n):
    ratios = balanced_ratios(M125, n)
    assert ratios[1:] == [1.0] * (n - 1) and 0 < ratios[0] <= 1.0
    equal = [step_bytes(M125, lay) for lay in split_layouts(M125, n)]
    balanced = [step_bytes(M125, lay) for lay in split_layouts(M125, n, ratios)]
    assert max(balanced) < max(equal)  # the master no longer reads the most by the whole head
    assert sum(balanced) == sum(equal)  # the same model, only moved
    layouts = split_layouts(M125, n, ratios)
    assert layouts[0].n_ffn <= min(lay.n_ffn for lay in layouts[1:])


def test_balanced_two_devices_split_the_bytes_evenly():
    b = [step_bytes(M125, lay) for lay in split_layouts(M125, 2, balanced_ratios(M125, 2))]
    assert abs(b[0] - b[1]) / max(b) < 0.02


def test_balanced_counts_private_layers_on_the_master():
    plain, private = balanced_ratios(M125, 3), balanced_ratios(M125, 3, private_layers=2)
    assert private[0] <= plain[0]


def test_ratio_keywords(tmp_path):
    assert parse_ratios("equal", 3) == [1.0, 1.0, 1.0]
    assert DEFAULT_PLACEMENT in ("equal", "balanced")
    missing = str(tmp_path / "nothing")  # no model to read: equal shares, and cached_shards names the folder
    assert plan_ratios(GenerateOptions(model=missing, devices=2, ratios="balanced")) == [1.0, 1.0]
    assert plan_ratios(GenerateOptions(model=missing, devices=2, ratios="3,1")) == [3.0, 1.0]


def _plain_rope(x, cfg, pos):  # the unfused formula: x [Hx, T, Dh]
    T = x.shape[1]
    freqs = np.arange(pos, pos + T, dtype=np.float32)[:, None] * cfg.rope_inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


@pytest.mark.parametrize("T,pos", [(1, 0), (1, 37), (5, 3)])
def test_fused_elementwise_work_is_bit_identical(T, pos):
    rng = np.random.default_rng(T + pos)
    x = rng.standard_normal((T, 768), dtype=np.float32) * 3
    w = rng.standard_normal(768, dtype=np.float32)
    eps = 1e-5
    plain_norm = (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w
    assert np.array_equal(M.rms_norm(x, w, eps), plain_norm)

    q = rng.standard_normal((T, 7, 64), dtype=np.float32)  # [T, Hx, Dh]
    cos, sin = M.Rope().at(M125, pos, T)
    want = _plain_rope(q.transpose(1, 0, 2), M125, pos).transpose(1, 0, 2)
    assert np.array_equal(M.rope(q.copy(), cos, sin), want)

    s = rng.standard_normal((3, 2, T, 9), dtype=np.float32)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    assert np.array_equal(M.softmax(s.copy()), e / e.sum(axis=-1, keepdims=True))


def test_rope_tables_are_shared_and_follow_the_position():
    rope = M.Rope()
    a = rope.at(M125, 4, 1)
    assert rope.at(M125, 4, 1) is a
    assert not np.array_equal(rope.at(M125, 5, 1)[0], a[0])
