"""Where a device's tensors live: a whole HF checkpoint, or one of our shard folders.

Layer: weights (imports tpicore.model and tpicore.errors only). Owns naming a block's tensors,
checking their shapes against the model's table, and reading them as float32. Must not compute,
schedule or talk to other devices.
"""

from __future__ import annotations

import os

import numpy as np

from tpicore.model.config import ModelConfig
from tpicore.model.split import ATTN_LEAVES, FFN_LEAVES, Block, Layout, plan_layouts
from tpicore.weights.checkpoint import Checkpoint, to_f32
from tpicore.weights.manifest import read_manifest


def head_row_ranges(store: "TensorStore") -> list[tuple[int, int]]:
    """The LM head's vocabulary chunks [lo, hi): rows of at most the smaller layer block's size.

    Fixed by the model and this device's layout only, so the resident and the windowed path chunk
    alike (bit-identical logits), and a chunk always fits a window slot a layer block has used.
    """
    cfg = store.cfg
    layer_elems = [sum(int(np.prod(store.ckpt.info(n).shape)) for n in store.leaves((kind, 0)).values())
                   for kind in ("attn", "ffn")]
    rows = max(1, min(layer_elems) // cfg.hidden_size)
    return [(lo, min(lo + rows, cfg.vocab_size)) for lo in range(0, cfg.vocab_size, rows)]


class TensorStore:
    """A device's tensors by HF name: a whole HF checkpoint, or one of our shard folders
    (whose manifest may map several logical layers onto one stored layer)."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, layout: Layout, layer_map: list[int] | None = None,
                 fingerprint: str = "", root: str = "") -> None:
        self.ckpt, self.cfg, self.layout = ckpt, cfg, layout
        self.layer_map = layer_map or list(range(cfg.num_hidden_layers))
        self.fingerprint, self.root = fingerprint, root
        self.note = ""  # e.g. "synthetic model with K distinct layers ...: outputs are meaningless"

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "TensorStore":
        cfg = ModelConfig.from_dir(model_dir)
        return cls(Checkpoint.from_dir(model_dir), cfg, plan_layouts(cfg, 1)[0], root=model_dir)

    @classmethod
    def from_shard_dir(cls, shard_dir: str) -> "TensorStore":
        man = read_manifest(shard_dir)
        cfg = ModelConfig.from_dict(man["config"], source=os.path.join(shard_dir, "manifest.json"),
                                    generation=man.get("generation_config"))
        files = [os.path.join(shard_dir, f) for f in man["files"]]
        store = cls(Checkpoint(files, shard_dir), cfg, Layout.from_json(man["layout"]), man.get("layer_map"),
                    man["fingerprint"], shard_dir)
        store.note = (man.get("synthetic") or {}).get("note", "")
        return store

    def name(self, layer: int, leaf: str) -> str:
        return f"model.layers.{self.layer_map[layer]}.{leaf}"

    def leaves(self, block: Block) -> dict[str, str]:
        """leaf name -> stored tensor name for the tensors of one block."""
        kind, layer = block
        if kind in ("attn", "ffn"):
            leaves = ATTN_LEAVES if kind == "attn" else FFN_LEAVES
            return {leaf: self.name(layer, leaf) for leaf in leaves if self.name(layer, leaf) in self.ckpt}
        if kind == "post":  # whole head (-1), or chunk c of its rows (the norm goes with chunk 0)
            head = "lm_head.weight" if "lm_head.weight" in self.ckpt else "model.embed_tokens.weight"
            return {"norm": "model.norm.weight", "lm_head": head} if layer <= 0 else {"lm_head": head}
        return {}

    def check(self) -> None:
        """Fail early, naming the tensor and file, if a required tensor is missing or mis-shaped."""
        cfg, lay = self.cfg, self.layout
        D, Dh = cfg.hidden_size, cfg.head_dim
        q, kv, f = lay.n_heads * Dh, lay.n_kv_heads * Dh, lay.n_ffn
        shapes = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
                  "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D),
                  "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, q),
                  "mlp.gate_proj.weight": (f, D), "mlp.up_proj.weight": (f, D), "mlp.down_proj.weight": (D, f)}
        if cfg.attention_bias:
            shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if cfg.o_proj_bias:
            shapes["self_attn.o_proj.bias"] = (D,)
        if cfg.mlp_bias:
            shapes.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (D,)})
        for layer in sorted(set(self.layer_map)):
            for leaf, shape in shapes.items():
                self.ckpt.info(f"model.layers.{layer}.{leaf}", shape)
        if lay.rank == 0:
            self.ckpt.info("model.embed_tokens.weight", (cfg.vocab_size, D))
            self.ckpt.info("model.norm.weight", (D,))
            if not cfg.tie_word_embeddings:
                self.ckpt.info("lm_head.weight", (cfg.vocab_size, D))

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows for the tokens at hand only (the table is never read whole): [T] -> [T, D]."""
        return self.ckpt.get_rows("model.embed_tokens.weight", ids)

    def load(self, name: str) -> np.ndarray:
        """A float32 tensor: f32 stays a zero-copy memory map; f16/bf16 are upcast into RAM."""
        info = self.ckpt.info(name)
        if info.dtype == "F32":
            return self.ckpt.raw(name)  # zero-copy memory map
        return to_f32(self.ckpt.read(name), info.dtype)

    def block_nbytes(self, block: Block) -> int:
        """Stored bytes of one block's tensors (a head chunk counts only its rows)."""
        kind, c = block
        total = 0
        for leaf, name in self.leaves(block).items():
            info = self.ckpt.info(name)
            if kind == "post" and c >= 0 and leaf == "lm_head":
                lo, hi = head_row_ranges(self)[c]
                total += info.nbytes // info.shape[0] * (hi - lo)
            else:
                total += info.nbytes
        return total
