"""Parity with transformers.LlamaForCausalLM on tiny random models, and KV-cache equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_logits

from tpicore.model import llama as M
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.weights.store import TensorStore

PROMPT = [1, 17, 42, 99, 5, 130, 64]


def device_for(model_dir: str, max_seq: int = 64) -> Device:
    store = TensorStore.from_model_dir(model_dir)
    store.check()
    return Device(store, ResidentSource(store), max_seq)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


MATRIX = [
    ("mha", "float32", False), ("gqa", "float32", False), ("gqa1", "float32", False),
    ("llama3", "float32", False), ("tied", "float32", False), ("headdim", "float32", False),
    ("bias", "float32", False), ("wide", "float32", False),
    ("gqa", "float16", False), ("gqa", "bfloat16", False), ("llama3", "bfloat16", True),
    ("gqa", "float32", True),
]


@pytest.mark.parametrize("variant,dtype,sharded", MATRIX)
def test_logits_and_greedy_match_hf(hf_models, variant, dtype, sharded):
    model_dir, ref = hf_models(variant, dtype, sharded)
    dev = device_for(model_dir)
    gen = generate(dev.step, PROMPT, 32, max_seq=64, keep_logits=True)
    assert len(gen.logits) == len(PROMPT) + 32 - 1
    fed = PROMPT + gen.tokens[:-1]
    ours, theirs = np.stack(gen.logits), hf_logits(ref, fed)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert gen.tokens == hf_greedy(ref, PROMPT, 32)


@pytest.mark.parametrize("variant", ["gqa", "llama3", "headdim"])
def test_cached_decode_equals_full_recompute(hf_models, variant):
    model_dir, _ = hf_models(variant)
    dev = device_for(model_dir)
    store = dev.store
    w = {n: store.load(n) for n in store.ckpt.tensors}
    seq = list(PROMPT)
    logits = dev.step(np.array(seq), 0, all_logits=True)
    for _ in range(12):
        seq.append(int(np.argmax(logits[-1])))
        logits = dev.step(np.array(seq[-1:]), len(seq) - 1)
        caches = [M.KVCache(store.layout.n_kv_heads, 64, store.cfg.head_dim) for _ in range(store.cfg.num_hidden_layers)]
        full = M.forward(np.array(seq), w, store.cfg, caches, 0)
        np.testing.assert_allclose(logits[-1], full[-1], atol=2e-5, rtol=0)


def test_prefill_in_chunks_equals_one_prefill(hf_models):
    """Writing the cache in two chunks leaves no hole: positions line up with a single prefill."""
    model_dir, _ = hf_models("gqa")
    a, b = device_for(model_dir), device_for(model_dir)
    one = a.step(np.array(PROMPT), 0, all_logits=True)
    b.step(np.array(PROMPT[:3]), 0)
    two = b.step(np.array(PROMPT[3:]), 3, all_logits=True)
    np.testing.assert_allclose(one[3:], two, atol=2e-5, rtol=0)


def test_sampling_is_seeded_and_respects_top_k(hf_models):
    from tpicore.runtime.generate import Sampling

    model_dir, _ = hf_models("gqa")
    s = Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=7)
    g1 = generate(device_for(model_dir).step, PROMPT, 10, s, max_seq=64, keep_logits=True)
    g2 = generate(device_for(model_dir).step, PROMPT, 10, s, max_seq=64)
    assert g1.tokens == g2.tokens
    for row, tok in zip(g1.logits[len(PROMPT) - 1:], g1.tokens):
        assert tok in np.argsort(-row)[:5]
