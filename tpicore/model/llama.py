"""The Llama math: plain functions over NumPy arrays and weights dicts keyed by HF leaf names.

Owns the forward pass only. No file I/O, threads, sockets or globals here: weights arrive as dicts,
the KV cache as an object, and the collective as the `allreduce` function passed into the blocks.
At world size 1 `allreduce` is the identity, so the single-process and tensor-parallel engines run
this same code on full or sharded weights (shapes below; an `l` suffix = this device's share).

Dimension legend:
  T tokens in this step, S = pos + T cached positions, D hidden, V vocab, F FFN size, Dh head dim,
  H query heads, Hkv KV heads; on a device: Hl query heads, Hkvl KV heads, Fl FFN columns.
Weight layout is HF's (out, in), so checkpoints load without permutation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tpicore.model.config import ModelConfig

Weights = dict[str, np.ndarray]
AllReduce = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


class KVCache:
    """Preallocated keys/values of this device's KV heads for one layer: [Hkvl, S_max, Dh] each."""

    def __init__(self, n_kv_heads: int, max_seq: int, head_dim: int) -> None:
        self.k = np.zeros((n_kv_heads, max_seq, head_dim), dtype=np.float32)
        self.v = np.zeros((n_kv_heads, max_seq, head_dim), dtype=np.float32)

    @property
    def max_seq(self) -> int:
        return self.k.shape[1]


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T (+ b) for w in (out, in) layout: [T, in] -> [T, out].

    For a few rows the (w @ x.T).T form is several times faster in OpenBLAS than x @ w.T
    (machine.md, small-batch trap); for long prompts the plain GEMM wins.
    """
    if x.shape[0] == 1:
        y = (w @ x[0])[None, :]  # GEMV: [out, in] @ [in] -> [1, out]
    elif x.shape[0] <= 16:
        y = np.ascontiguousarray((w @ x.T).T)  # [out, T] -> [T, out]
    else:
        y = x @ w.T  # [T, in] @ [in, out] -> [T, out]
    if b is not None:
        y += b
    return y


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # [T, D] -> [T, D]
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def rope_cos_sin(cfg: ModelConfig, pos: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin for positions pos..pos+T-1: [T, Dh], halves repeated (HF rotate_half convention)."""
    freqs = np.arange(pos, pos + T, dtype=np.float32)[:, None] * cfg.rope_inv_freq[None, :]  # [T, Dh/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, Dh]
    return np.cos(emb), np.sin(emb)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x [Hx, T, Dh], cos/sin [T, Dh] -> [Hx, T, Dh]; rotate_half(x) = cat(-x2, x1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int) -> np.ndarray:
    """Causal GQA attention over this device's heads; returns its partial o_proj output [T, D].

    Local query heads map to local KV heads in equal consecutive groups (the split plan guarantees
    it: a device holds whole GQA groups, or part of one group and that group's KV head).
    """
    T, Dh = x.shape[0], cfg.head_dim
    q = linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))  # [T, D] -> [T, Hl*Dh]
    k = linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))  # [T, D] -> [T, Hkvl*Dh]
    v = linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))  # [T, D] -> [T, Hkvl*Dh]
    q = q.reshape(T, -1, Dh).transpose(1, 0, 2)  # [T, Hl*Dh] -> [Hl, T, Dh]
    k = k.reshape(T, -1, Dh).transpose(1, 0, 2)  # [T, Hkvl*Dh] -> [Hkvl, T, Dh]
    v = v.reshape(T, -1, Dh).transpose(1, 0, 2)  # [T, Hkvl*Dh] -> [Hkvl, T, Dh]
    cos, sin = rope_cos_sin(cfg, pos, T)
    q, k = rope(q, cos, sin), rope(k, cos, sin)

    S = pos + T
    kv.k[:, pos:S] = k
    kv.v[:, pos:S] = v
    Hl, Hkvl = q.shape[0], k.shape[0]
    g = Hl // Hkvl
    qg = q.reshape(Hkvl, g * T, Dh)  # [Hl, T, Dh] -> [Hkvl, g*T, Dh]
    scores = (qg @ kv.k[:, :S].transpose(0, 2, 1)) * np.float32(Dh ** -0.5)  # -> [Hkvl, g*T, S]
    scores = scores.reshape(Hkvl, g, T, S)  # -> [Hkvl, g, T, S]
    if T > 1:  # query i (at pos+i) sees keys 0..pos+i
        future = np.arange(S)[None, :] > (pos + np.arange(T))[:, None]  # [T, S]
        scores[..., future] = -np.inf
    probs = softmax(scores).reshape(Hkvl, g * T, S)  # [Hkvl, g*T, S]
    out = (probs @ kv.v[:, :S]).reshape(Hl, T, Dh)  # [Hkvl, g*T, Dh] -> [Hl, T, Dh]
    out = out.transpose(1, 0, 2).reshape(T, Hl * Dh)  # -> [T, Hl*Dh]
    return linear(out, w["self_attn.o_proj.weight"])  # [T, Hl*Dh] -> [T, D] (partial sum)


def mlp(x: np.ndarray, w: Weights) -> np.ndarray:
    """SwiGLU over this device's FFN columns; returns the partial down_proj output [T, D]."""
    gate = linear(x, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))  # [T, D] -> [T, Fl]
    up = linear(x, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))  # [T, D] -> [T, Fl]
    act = gate / (1.0 + np.exp(-gate)) * up  # silu(gate) * up: [T, Fl]
    return linear(act, w["mlp.down_proj.weight"])  # [T, Fl] -> [T, D] (partial sum)


def attn_block(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int,
               allreduce: AllReduce) -> np.ndarray:
    """The paper's Attn_l block: x + allreduce(attention(norm(x))) (+ o_proj bias once, after the sum)."""
    h = allreduce(attention(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps), w, cfg, kv, pos))
    if "self_attn.o_proj.bias" in w:
        h += w["self_attn.o_proj.bias"]
    return x + h


def ffn_block(x: np.ndarray, w: Weights, cfg: ModelConfig, allreduce: AllReduce) -> np.ndarray:
    """The paper's FFN_l block: x + allreduce(mlp(norm(x))) (+ down_proj bias once, after the sum)."""
    h = allreduce(mlp(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w))
    if "mlp.down_proj.bias" in w:
        h += w["mlp.down_proj.bias"]
    return x + h


def block(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int,
          allreduce: AllReduce) -> np.ndarray:
    """One decoder layer: two allreduces, one after attention and one after the MLP."""
    x = attn_block(x, w, cfg, kv, pos, allreduce)  # allreduce 1
    return ffn_block(x, w, cfg, allreduce)  # allreduce 2


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    # ids [T] -> [T, D]
    return np.asarray(table[ids], dtype=np.float32)


def lm_head(x: np.ndarray, norm_w: np.ndarray, head_w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    # [T, D] -> [T, V]
    return linear(rms_norm(x, norm_w, cfg.rms_norm_eps), head_w)


def forward(ids: np.ndarray, w: dict[str, np.ndarray], cfg: ModelConfig, caches: list[KVCache],
            pos: int, allreduce: AllReduce = identity) -> np.ndarray:
    """Whole-model reference forward over HF-named weights (`model.layers.{i}.…`): ids [T] -> logits [T, V]."""
    x = embed(ids, w["model.embed_tokens.weight"])  # [T] -> [T, D]
    for i, kv in enumerate(caches):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
        x = block(x, layer, cfg, kv, pos, allreduce)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return lm_head(x, w["model.norm.weight"], head, cfg)
