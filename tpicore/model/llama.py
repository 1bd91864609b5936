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


class Rope:
    """RoPE's cos and signed sin for the positions of the current step, computed once per step and
    shared by every layer's cache (pass one instance to all of a device's KVCaches)."""

    def __init__(self) -> None:
        self._key: tuple[ModelConfig, int, int] | None = None
        self._tables: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.float32), np.empty(0, np.float32))

    def at(self, cfg: ModelConfig, pos: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """rope_cos_sin(cfg, pos, T), reused while (pos, T) stays the same."""
        key = self._key
        if key is None or key[0] is not cfg or key[1] != pos or key[2] != T:
            self._tables, self._key = rope_cos_sin(cfg, pos, T), (cfg, pos, T)
        return self._tables


class KVCache:
    """Preallocated keys/values of this device's KV heads for one layer: [Hkvl, S_max, Dh] each.
    `rope`: a Rope shared by the device's layers (default: this cache's own)."""

    def __init__(self, n_kv_heads: int, max_seq: int, head_dim: int, rope: Rope | None = None) -> None:
        self.k = np.zeros((n_kv_heads, max_seq, head_dim), dtype=np.float32)
        self.v = np.zeros((n_kv_heads, max_seq, head_dim), dtype=np.float32)
        self.rope = rope if rope is not None else Rope()

    @property
    def max_seq(self) -> int:
        return self.k.shape[1]


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T (+ b) for w in (out, in) layout: [T, in] -> [T, out], into `out` [T, out] when given.

    For a few rows the (w @ x.T).T form is several times faster in OpenBLAS than x @ w.T
    (machine.md, small-batch trap); for long prompts the plain GEMM wins. A one-row `out` whose row
    is contiguous takes the GEMV's result directly (the same BLAS call, so the same bits).
    """
    if out is not None and x.shape[0] == 1 and isinstance(w, np.ndarray) and out[0].flags.c_contiguous:
        y = out
        np.matmul(w, x[0], out=y[0])  # GEMV: [out, in] @ [in] -> [out], in place
    elif not isinstance(w, np.ndarray):  # a packed weight (tpicore.weights.packed.QuantMatrix): its own GEMV
        y = w.linear(x)  # [T, in] -> [T, out]
    elif x.shape[0] == 1:
        y = (w @ x[0])[None, :]  # GEMV: [out, in] @ [in] -> [1, out]
    elif x.shape[0] <= 16:
        y = np.ascontiguousarray((w @ x.T).T)  # [out, T] -> [T, out]
    else:
        y = x @ w.T  # [T, in] @ [in, out] -> [T, out]
    if out is not None and y is not out:
        out[...] = y
        y = out
    if b is not None:
        y += b
    return y


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # [T, D] -> [T, D]; np.add.reduce / D is np.mean's own float32 sum and division, without its Python layers
    var = np.add.reduce(x * x, axis=-1, keepdims=True)  # [T, 1]
    var /= np.float32(x.shape[-1])
    var += eps
    y = x / np.sqrt(var, out=var)
    y *= w
    return y


def rope_cos_sin(cfg: ModelConfig, pos: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin for positions pos..pos+T-1: [T, Dh] each, halves repeated (HF rotate_half
    convention), the sin's first half negated (so that rope() swaps halves instead of negating x)."""
    freqs = np.arange(pos, pos + T, dtype=np.float32)[:, None] * cfg.rope_inv_freq[None, :]  # [T, Dh/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, Dh]
    sin = np.sin(emb)
    half = freqs.shape[-1]
    np.negative(sin[:, :half], out=sin[:, :half])
    return np.cos(emb), sin


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """In place: x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) = cat(x2, x1) * (-1, 1)
    (the sign lives in the signed sin: bit for bit the same products).
    x [T, Hx, Dh], cos/sin [T, Dh] -> x [T, Hx, Dh]."""
    T, Hx, Dh = x.shape
    swapped = x.reshape(T, Hx, 2, Dh // 2)[:, :, ::-1]  # a view: [T, Hx, 2, Dh/2], halves (x2, x1)
    rot = (swapped * sin.reshape(T, 1, 2, Dh // 2)).reshape(T, Hx, Dh)  # [T, Hx, Dh]
    x *= cos[:, None, :]
    x += rot
    return x


def softmax(x: np.ndarray) -> np.ndarray:
    """In place over the last axis (x is a scratch array): exp(x - max) / sum."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def attention(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int) -> np.ndarray:
    """Causal GQA attention over this device's heads; returns its partial o_proj output [T, D].

    Local query heads map to local KV heads in equal consecutive groups (the split plan guarantees
    it: a device holds whole GQA groups, or part of one group and that group's KV head).
    """
    T, Dh = x.shape[0], cfg.head_dim
    wq, wk, wv = w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]
    nq, nkv = wq.shape[0], wk.shape[0]  # Hl*Dh, Hkvl*Dh
    Hl, Hkvl = nq // Dh, nkv // Dh
    qkv = np.empty((T, nq + 2 * nkv), dtype=np.float32)  # [T, (Hl + 2 Hkvl) Dh]: q | k | v
    linear(x, wq, w.get("self_attn.q_proj.bias"), out=qkv[:, :nq])  # [T, D] -> [T, Hl*Dh]
    linear(x, wk, w.get("self_attn.k_proj.bias"), out=qkv[:, nq:nq + nkv])  # [T, D] -> [T, Hkvl*Dh]
    linear(x, wv, w.get("self_attn.v_proj.bias"), out=qkv[:, nq + nkv:])  # [T, D] -> [T, Hkvl*Dh]
    cos, sin = kv.rope.at(cfg, pos, T)
    qk = rope(qkv[:, :nq + nkv].reshape(T, Hl + Hkvl, Dh), cos, sin)  # q and k at once: [T, Hl+Hkvl, Dh]
    q = qk[:, :Hl].transpose(1, 0, 2)  # [T, Hl, Dh] -> [Hl, T, Dh]
    k = qk[:, Hl:].transpose(1, 0, 2)  # [T, Hkvl, Dh] -> [Hkvl, T, Dh]
    v = qkv[:, nq + nkv:].reshape(T, Hkvl, Dh).transpose(1, 0, 2)  # [T, Hkvl*Dh] -> [Hkvl, T, Dh]

    S = pos + T
    kv.k[:, pos:S] = k
    kv.v[:, pos:S] = v
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
    act = np.negative(gate)  # silu(gate) * up = gate / (1 + exp(-gate)) * up, in place: [T, Fl]
    np.exp(act, out=act)
    act += 1.0
    np.divide(gate, act, out=act)
    act *= up
    return linear(act, w["mlp.down_proj.weight"])  # [T, Fl] -> [T, D] (partial sum)


def attn_block(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int,
               allreduce: AllReduce) -> np.ndarray:
    """The paper's Attn_l block: x + allreduce(attention(norm(x))) (+ o_proj bias once, after the sum)."""
    h = allreduce(attention(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps), w, cfg, kv, pos))
    if "self_attn.o_proj.bias" in w:
        h += w["self_attn.o_proj.bias"]
    h += x  # x + h, into the allreduce's buffer
    return h


def ffn_block(x: np.ndarray, w: Weights, cfg: ModelConfig, allreduce: AllReduce) -> np.ndarray:
    """The paper's FFN_l block: x + allreduce(mlp(norm(x))) (+ down_proj bias once, after the sum)."""
    h = allreduce(mlp(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w))
    if "mlp.down_proj.bias" in w:
        h += w["mlp.down_proj.bias"]
    h += x  # x + h, into the allreduce's buffer
    return h


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
