"""What one block costs in arithmetic and memory traffic: the inputs of a roofline compute model.

Layer: model (imports tpicore.model.tensors, tpicore.model.split, tpicore.model.config only). Owns `Work`
(floating-point operations and bytes moved through memory) and the work of each block a device runs,
derived from the one tensor table (tpicore.model.tensors: shapes under a device's `Layout`) -- no shape is
written here. Must not time anything, read files or know about clocks (the emulator's clock turns Work
into seconds: max(bytes / memory bandwidth, flops / peak)).

Per block of T tokens at context length S (positions 0..S-1 after the block), with the block's tensors
held as float32:
    weights     a 2-D tensor [out, in]: 2 T out in flops (a GEMM), its 4 out in bytes read once;
                a 1-D tensor (norm weight, bias) [n]: T n flops, 4 n bytes
    attention   scores and values over the KV cache: 4 T S q flops (q = local query heads x head dim);
                the cache read 2 S kv x 4 bytes and the new rows written 2 T kv x 4 bytes
    activations x in and out: 2 T D x 4 bytes (the rest of the intermediates is lower order)
    LM head     a vocabulary chunk of `rows` rows is the head's [rows, D] slice of the table
Reductions (the allreduce's adds) and sampling are `elementwise_work` of their sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpicore.model.config import ModelConfig
from tpicore.model.split import Layout
from tpicore.model.tensors import TENSORS

F32_BYTES = 4


@dataclass(frozen=True)
class Work:
    """Arithmetic and memory traffic of one piece of compute (a block, a reduction, a sampling step)."""

    flops: float = 0.0
    nbytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.nbytes + other.nbytes)


NO_WORK = Work()


def elementwise_work(elems: int, reads: int = 1, writes: int = 0, flops_per_elem: float = 1.0) -> Work:
    """`elems` float32 elements read `reads` times and written `writes` times, `flops_per_elem` each
    (an allreduce add of n elements: elementwise_work(n, reads=2, writes=1))."""
    return Work(flops_per_elem * elems, F32_BYTES * elems * (reads + writes))


def block_work(cfg: ModelConfig, layout: Layout, kind: str, tokens: int, context: int,
               rows: int | None = None) -> Work:
    """The work of block `kind` ('attn', 'ffn', 'post'; 'pre' is a gather of `tokens` embedding rows) on a
    device holding `layout` for `tokens` new tokens with `context` positions in the KV cache after them.
    `rows`: the vocabulary rows of a head chunk (None: the whole head)."""
    D = cfg.hidden_size
    if kind == "pre":
        return Work(0.0, 2 * F32_BYTES * tokens * D)  # rows read, hidden state written
    flops, nbytes = 0.0, 2 * F32_BYTES * tokens * D  # x in, x out
    for t in TENSORS:
        if t.block != kind or not t.exists(cfg):
            continue
        shape = t.shape(cfg, layout)
        if t.name == "lm_head.weight" and rows is not None:
            shape = (rows,) + shape[1:]
        elems = math.prod(shape)
        flops += (2 if len(shape) == 2 else 1) * tokens * elems
        nbytes += F32_BYTES * elems
    if kind == "post" and cfg.tie_word_embeddings:  # the head reads the embedding table
        elems = (cfg.vocab_size if rows is None else rows) * D
        flops, nbytes = flops + 2 * tokens * elems, nbytes + F32_BYTES * elems
    if kind == "attn":
        q, kv = layout.n_heads * cfg.head_dim, layout.n_kv_heads * cfg.head_dim
        flops += 4 * tokens * context * q
        nbytes += F32_BYTES * 2 * kv * (context + tokens)
    return Work(flops, nbytes)
