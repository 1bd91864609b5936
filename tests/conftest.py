"""Shared test fixtures: tiny HF Llama checkpoints built locally with transformers (the parity reference)."""

from __future__ import annotations

import os

import pytest

# Tiny odd-sized configs covering the parity matrix (hidden 48, vocab 131, 3 layers by default).
TINY_BASE = dict(
    vocab_size=131, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
TINY_VARIANTS: dict[str, dict] = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "gqa1": dict(num_attention_heads=6, num_key_value_heads=1),
    "llama3": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=256,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)),
    "tied": dict(tie_word_embeddings=True),
    "headdim": dict(head_dim=16, num_attention_heads=6, num_key_value_heads=3),
    "bias": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    "wide": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=91),
}


def build_hf_model(out_dir: str, variant: str = "gqa", torch_dtype: str = "float32", seed: int = 0,
                   max_shard_size: str | None = None, **overrides):
    """Save a random tiny LlamaForCausalLM in HF layout; returns the (fp32) torch model used as reference."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {**TINY_BASE, **TINY_VARIANTS[variant], **overrides}
    torch.manual_seed(seed)
    cfg = LlamaConfig(**kw)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[torch_dtype]
    saved = model.to(dt)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    saved.save_pretrained(out_dir, **kwargs)
    # the reference is HF's own loader computing in fp32 from the stored (possibly rounded) weights
    return LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Lazily built tiny checkpoints: hf_models(variant, dtype='float32', sharded=False) -> (dir, torch model)."""
    cache: dict = {}

    def get(variant: str = "gqa", torch_dtype: str = "float32", sharded: bool = False, **overrides):
        key = (variant, torch_dtype, sharded, tuple(sorted(overrides.items())))
        if key not in cache:
            d = str(tmp_path_factory.mktemp(f"hf-{variant}-{torch_dtype}{'-sharded' if sharded else ''}"))
            model = build_hf_model(d, variant, torch_dtype, max_shard_size="20KB" if sharded else None, **overrides)
            cache[key] = (d, model)
        return cache[key]

    return get


def hf_logits(model, ids) -> "numpy.ndarray":  # noqa: F821 (numpy imported lazily, below)
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return out.float().numpy().astype(np.float32)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
