"""The Llama math: plain functions over NumPy arrays and weights dicts keyed by HF leaf names.

Owns the forward pass only. No file I/O, threads, sockets or globals here: weights arrive as dicts,
the KV cache as an object, and the collective as the `allreduce` function passed into the blocks.
At world size 1 `allreduce` is the identity, so the single-process and tensor-parallel engines run
this same code on full or sharded weights (shapes below; an `l` suffix = this device's share).

Dimension legend:
  T tokens in this step, S = pos + T cached positions, D hidden, V vocab, F FFN size, Dh head dim,
  H query heads, Hkv KV heads; on a device: Hl query heads, Hkvl KV heads, Fl FFN columns.
Weight layout is HF's (out, in), so checkpoints load without permutation.

One-token decode steps given a `DecodeScratch` (the Device passes one) take a lean path: every activation
lands in a preallocated buffer (`out=`), the norm's scalar arithmetic runs on one float32 scalar, and the
views the step needs are built once per shape. It performs the same float32 operations on the same
operands in the same order as the general path, so the two give the same bits (tests/test_lean_decode.py).
"""

from __future__ import annotations

import math
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
        self._row = self._tables

    def at(self, cfg: ModelConfig, pos: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """rope_cos_sin(cfg, pos, T), reused while (pos, T) stays the same."""
        key = self._key
        if key is None or key[0] is not cfg or key[1] != pos or key[2] != T:
            self._tables, self._key = rope_cos_sin(cfg, pos, T), (cfg, pos, T)
            cos, sin = self._tables
            self._row = (cos[0], sin[0].reshape(2, cos.shape[1] // 2))
        return self._tables

    def row(self, cfg: ModelConfig, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """One position's tables as the decode path broadcasts them: cos [Dh], signed sin [2, Dh/2]."""
        self.at(cfg, pos, 1)
        return self._row


class KVCache:
    """Preallocated keys/values of this device's KV heads for one layer: [Hkvl, S_max, Dh] each.
    `rope`: a Rope shared by the device's layers (default: this cache's own)."""

    def __init__(self, n_kv_heads: int, max_seq: int, head_dim: int, rope: Rope | None = None) -> None:
        self.kv = np.zeros((2, n_kv_heads, max_seq, head_dim), dtype=np.float32)  # keys | values: one write a step
        self.k, self.v = self.kv[0], self.kv[1]  # views: [Hkvl, S_max, Dh] each, C-contiguous
        self.k_t = self.k.transpose(0, 2, 1)  # a view: [Hkvl, Dh, S_max], the scores' right operand
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
    """In place over the last axis (x is a scratch array): exp(x - max) / sum. The ufuncs' reduce is what
    x.max / x.sum call, without their Python layers."""
    x -= np.maximum.reduce(x, axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= np.add.reduce(x, axis=-1, keepdims=True)
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


# ---------------------------------------------------------------------------------------------------
# The lean one-token path (T = 1): the general path's operations, into preallocated buffers


class _AttnViews:
    """One attention shape's buffer and views: q | k | v of one token, RoPE's rotated halves."""

    def __init__(self, nq: int, nkv: int, Dh: int) -> None:
        Hl, Hkvl = nq // Dh, nkv // Dh
        self.qkv = np.empty(nq + 2 * nkv, dtype=np.float32)  # [(Hl + 2 Hkvl) Dh]: q | k | v
        self.q, self.k, self.v = self.qkv[:nq], self.qkv[nq:nq + nkv], self.qkv[nq + nkv:]
        self.qk = self.qkv[:nq + nkv].reshape(Hl + Hkvl, Dh)  # q and k heads: [Hl+Hkvl, Dh]
        self.swapped = self.qk.reshape(Hl + Hkvl, 2, Dh // 2)[:, ::-1]  # a view: halves (x2, x1)
        self.rot = np.empty((Hl + Hkvl, 2, Dh // 2), dtype=np.float32)  # [Hl+Hkvl, 2, Dh/2]
        self.rot_heads = self.rot.reshape(Hl + Hkvl, Dh)  # -> [Hl+Hkvl, Dh]
        self.q_groups = self.q.reshape(Hkvl, Hl // Hkvl, Dh)  # [Hl*Dh] -> [Hkvl, g, Dh]
        self.kv_heads = self.qkv[nq:].reshape(2, Hkvl, Dh)  # k | v: [2, Hkvl, Dh], as KVCache.kv holds them


class _FfnViews:
    """One FFN shape's buffers: gate, up and the SiLU-gated activation of one token, [Fl] each."""

    def __init__(self, n_ffn: int) -> None:
        self.gate, self.up, self.act = (np.empty(n_ffn, dtype=np.float32) for _ in range(3))


class DecodeScratch:
    """A device's preallocated buffers for one-token steps, shared by its layers (they run one at a time).

    Two hidden-state buffers [1, D] take turns as block outputs (a block never writes the x it reads), so
    a block's output stays valid until the next block after it: copy what must outlive the step.
    """

    def __init__(self, hidden_size: int) -> None:
        self.hidden = (np.empty((1, hidden_size), dtype=np.float32), np.empty((1, hidden_size), dtype=np.float32))
        self.normed = np.empty(hidden_size, dtype=np.float32)  # [D]: a norm's output
        self.size = np.float32(hidden_size)  # the norm's divisor, as rms_norm casts it
        self.squares = np.empty(hidden_size, dtype=np.float32)  # [D]: the norm's x * x
        self._attn: dict[tuple[int, int, int], _AttnViews] = {}
        self._ffn: dict[int, _FfnViews] = {}

    def output_for(self, x: np.ndarray) -> np.ndarray:
        """The hidden buffer that is not `x`: [1, D]."""
        a, b = self.hidden
        return b if x is a else a

    def attn(self, nq: int, nkv: int, Dh: int) -> _AttnViews:
        v = self._attn.get((nq, nkv, Dh))
        if v is None:
            v = self._attn[(nq, nkv, Dh)] = _AttnViews(nq, nkv, Dh)
        return v

    def ffn(self, n_ffn: int) -> _FfnViews:
        v = self._ffn.get(n_ffn)
        if v is None:
            v = self._ffn[n_ffn] = _FfnViews(n_ffn)
        return v


def _gemv(w: np.ndarray, x: np.ndarray, out: np.ndarray, b: np.ndarray | None = None) -> None:
    """out = w @ x (+ b): [out, in] @ [in] -> [out], in place (linear()'s one-row call, so its bits)."""
    if isinstance(w, np.ndarray):
        np.matmul(w, x, out=out)
    else:  # a packed weight (tpicore.weights.packed.QuantMatrix): its own GEMV
        out[...] = w.linear(x[None, :])[0]  # [1, in] -> [1, out] -> [out]
    if b is not None:
        out += b


def rms_norm_row(x: np.ndarray, w: np.ndarray, eps: float, s: DecodeScratch) -> np.ndarray:
    """rms_norm of one row x [D] (D: the scratch's hidden size) into s.normed [D]: the same float32 sum,
    then scalar float32 arithmetic (the root in double, rounded once: the correctly rounded float32 root,
    as np.sqrt gives)."""
    sq = np.multiply(x, x, out=s.squares)
    var = np.add.reduce(sq) / s.size + np.float32(eps)  # float32 scalars
    y = np.divide(x, np.float32(math.sqrt(var)), out=s.normed)
    y *= w
    return y


def attention_row(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int, s: DecodeScratch,
                  out: np.ndarray) -> np.ndarray:
    """attention() for one token, x [D] (normed) -> its partial o_proj output in `out` [D]."""
    Dh = cfg.head_dim
    wq, wk, wv = w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]
    b = s.attn(wq.shape[0], wk.shape[0], Dh)
    _gemv(wq, x, b.q, w.get("self_attn.q_proj.bias"))  # [D] -> [Hl*Dh]
    _gemv(wk, x, b.k, w.get("self_attn.k_proj.bias"))  # [D] -> [Hkvl*Dh]
    _gemv(wv, x, b.v, w.get("self_attn.v_proj.bias"))  # [D] -> [Hkvl*Dh]
    cos, sin = kv.rope.row(cfg, pos)  # [Dh], [2, Dh/2]
    np.multiply(b.swapped, sin, out=b.rot)  # rotate_half(q|k) * sin: [Hl+Hkvl, 2, Dh/2]
    b.qk *= cos
    b.qk += b.rot_heads  # RoPE on q and k, in place: [Hl+Hkvl, Dh]
    kv.kv[:, :, pos] = b.kv_heads  # keys and values of this position: [2, Hkvl, Dh]
    S = pos + 1
    scores = np.matmul(b.q_groups, kv.k_t[:, :, :S])  # [Hkvl, g, Dh] @ [Hkvl, Dh, S] -> [Hkvl, g, S]
    scores *= np.float32(Dh ** -0.5)
    probs = softmax(scores)  # [Hkvl, g, S]
    heads = np.matmul(probs, kv.v[:, :S])  # [Hkvl, g, S] @ [Hkvl, S, Dh] -> [Hkvl, g, Dh]
    _gemv(w["self_attn.o_proj.weight"], heads.reshape(-1), out)  # [Hl*Dh] -> [D] (partial sum)
    return out


def mlp_row(x: np.ndarray, w: Weights, s: DecodeScratch, out: np.ndarray) -> np.ndarray:
    """mlp() for one token, x [D] (normed) -> its partial down_proj output in `out` [D]."""
    wg = w["mlp.gate_proj.weight"]
    b = s.ffn(wg.shape[0])
    _gemv(wg, x, b.gate, w.get("mlp.gate_proj.bias"))  # [D] -> [Fl]
    _gemv(w["mlp.up_proj.weight"], x, b.up, w.get("mlp.up_proj.bias"))  # [D] -> [Fl]
    act = np.negative(b.gate, out=b.act)  # silu(gate) * up, as mlp(): [Fl]
    np.exp(act, out=act)
    act += 1.0
    np.divide(b.gate, act, out=act)
    act *= b.up
    _gemv(w["mlp.down_proj.weight"], act, out)  # [Fl] -> [D] (partial sum)
    return out


def attn_block(x: np.ndarray, w: Weights, cfg: ModelConfig, kv: KVCache, pos: int,
               allreduce: AllReduce, scratch: DecodeScratch | None = None) -> np.ndarray:
    """The paper's Attn_l block: x + allreduce(attention(norm(x))) (+ o_proj bias once, after the sum).
    With `scratch` and one token, the lean path: the result is one of scratch's hidden buffers."""
    if scratch is not None and x.shape[0] == 1:
        h = scratch.output_for(x)  # [1, D]
        attention_row(rms_norm_row(x[0], w["input_layernorm.weight"], cfg.rms_norm_eps, scratch), w, cfg, kv, pos,
                      scratch, h[0])
        h = allreduce(h)
    else:
        h = allreduce(attention(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps), w, cfg, kv, pos))
    if "self_attn.o_proj.bias" in w:
        h += w["self_attn.o_proj.bias"]
    h += x  # x + h, into the allreduce's buffer
    return h


def ffn_block(x: np.ndarray, w: Weights, cfg: ModelConfig, allreduce: AllReduce,
              scratch: DecodeScratch | None = None) -> np.ndarray:
    """The paper's FFN_l block: x + allreduce(mlp(norm(x))) (+ down_proj bias once, after the sum).
    With `scratch` and one token, the lean path: the result is one of scratch's hidden buffers."""
    if scratch is not None and x.shape[0] == 1:
        h = scratch.output_for(x)  # [1, D]
        mlp_row(rms_norm_row(x[0], w["post_attention_layernorm.weight"], cfg.rms_norm_eps, scratch), w, scratch,
                h[0])
        h = allreduce(h)
    else:
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
