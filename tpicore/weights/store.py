"""Where a device's tensors live: a whole HF checkpoint, or one of our shard folders.

Layer: weights (imports tpicore.model, the other weights modules and tpicore.errors). Owns naming a
block's tensors, checking their shapes against the table of tensors (tpicore.model.tensors), opening a
folder only after its integrity checks (tpicore.weights.integrity: CRC32s, recomputed fingerprint, float
dtypes, the config's layers), and reading tensors as float32. Must not compute, schedule or talk to other devices.
"""

from __future__ import annotations

import os

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import Block, Layout
from tpicore.model.tensors import (
    ATTN_LEAVES,
    EMBED,
    FFN_LEAVES,
    FINAL_NORM,
    LM_HEAD,
    MASTER_TENSORS,
    held_tensors,
    layer_name,
    whole,
)
from tpicore.weights.checkpoint import Checkpoint, to_f32
from tpicore.weights.gguf import GGUFCheckpoint, is_gguf_path
from tpicore.weights.integrity import (
    check_weight_tensors,
    verify_checkpoint,
    verify_folder,
)
from tpicore.weights.manifest import MANIFEST_FILE, check_fingerprint, read_manifest
from tpicore.weights.reader import BlockReader, read_raw


def head_row_ranges(store: "TensorStore") -> list[tuple[int, int]]:
    """The LM head's vocabulary chunks [lo, hi): rows of at most the smaller layer block's size.

    Fixed by the model and this device's layout only, so the resident and the windowed path chunk
    alike (bit-identical logits), and a chunk always fits a window slot a layer block has used.
    """
    cfg = store.cfg
    layer_elems = [sum(int(np.prod(store.ckpt.info(n).shape)) for n in store.leaves((kind, 0)).values())
                   for kind in ("attn", "ffn")]
    head_row = MASTER_TENSORS[LM_HEAD].shape(cfg, store.layout)[1]  # elements of one vocabulary row
    rows = max(1, min(layer_elems) // head_row)
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
        if is_gguf_path(model_dir):  # a GGUF file or split set: config and tensors from its header
            ckpt = GGUFCheckpoint(model_dir)
            return cls(ckpt, ckpt.cfg, whole(ckpt.cfg), root=model_dir)
        if not os.path.isdir(model_dir):
            kind = "a file, not a model folder" if os.path.exists(model_dir) else "model folder not found"
            raise TpiError(f"{model_dir}: {kind} (expected a folder with config.json and *.safetensors, or a .gguf file)")
        cfg = ModelConfig.from_dir(model_dir)
        ckpt = Checkpoint.from_dir(model_dir)
        check_weight_tensors(ckpt, set(range(cfg.num_hidden_layers)), os.path.join(model_dir, "config.json"),
                             cfg.num_hidden_layers)
        verify_checkpoint(model_dir, ckpt)  # sizes; content where the folder carries checksums
        return cls(ckpt, cfg, whole(cfg), root=model_dir)

    @classmethod
    def from_shard_dir(cls, shard_dir: str, verify: bool = True) -> "TensorStore":
        """Open one of our shard folders, checked before any tensor is used: the fingerprint is recomputed
        from the manifest (never read), the tensors must be float weights of the config's layers, and
        (verify) the file headers and every tensor's CRC32 must match the manifest."""
        if not os.path.isdir(shard_dir):
            raise TpiError(f"{shard_dir}: shard folder not found")
        man = read_manifest(shard_dir)
        path = os.path.join(shard_dir, MANIFEST_FILE)
        fingerprint = check_fingerprint(man, path)
        cfg = ModelConfig.from_dict(man.config, source=path, generation=man.generation_config)
        files = [os.path.join(shard_dir, f) for f in man.files]
        ckpt = Checkpoint(files, shard_dir)
        check_weight_tensors(ckpt, set(man.layer_map), path, cfg.num_hidden_layers)
        if verify:  # once per run: a check of this run (by this process or an ancestor) is trusted
            verify_folder(shard_dir, man, ckpt)
        store = cls(ckpt, cfg, man.layout, man.layer_map, fingerprint, shard_dir)
        store.note = man.synthetic.note if man.synthetic is not None else ""
        return store

    def name(self, layer: int, leaf: str) -> str:
        return layer_name(self.layer_map[layer], leaf)

    def leaves(self, block: Block) -> dict[str, str]:
        """leaf name -> stored tensor name for the tensors of one block."""
        kind, layer = block
        if kind in ("attn", "ffn"):
            leaves = ATTN_LEAVES if kind == "attn" else FFN_LEAVES
            return {leaf: self.name(layer, leaf) for leaf in leaves if self.name(layer, leaf) in self.ckpt}
        if kind == "post":  # whole head (-1), or chunk c of its rows (the norm goes with chunk 0)
            head = LM_HEAD if LM_HEAD in self.ckpt else EMBED  # a tied head reads the embedding
            return {"norm": FINAL_NORM, "lm_head": head} if layer <= 0 else {"lm_head": head}
        return {}

    def check(self) -> None:
        """Fail early, naming the tensor and file, if a tensor this device needs is missing or mis-shaped
        (shapes from the table in tpicore.model.tensors, for this device's layout), or if a stored tensor
        has an integer dtype or belongs to a layer the config does not have."""
        check_weight_tensors(self.ckpt, set(self.layer_map), self.cfg.source, self.cfg.num_hidden_layers)
        for name, shape in held_tensors(self.cfg, self.layout, sorted(set(self.layer_map))):
            self.ckpt.info(name, shape)

    def embed_rows(self, ids: np.ndarray, reader: BlockReader) -> np.ndarray:
        """Embedding rows for the tokens at hand only, read through `reader` (the table is never read
        whole; the reader decides whether the page cache is dropped behind): [T] -> [T, D]."""
        return reader.read_rows(self.ckpt.info("model.embed_tokens.weight"), ids)

    def load(self, name: str) -> np.ndarray:
        """A float32 tensor: f32 stays a zero-copy memory map; f16/bf16 are read whole, then upcast."""
        info = self.ckpt.info(name)
        if info.dtype == "F32":
            return self.ckpt.raw(name)  # zero-copy memory map
        return to_f32(read_raw(info), info.dtype)

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
