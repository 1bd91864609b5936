"""`tpi synth --format gguf`: a synthetic model written straight to a GGUF file, in any ggml type.

Layer: tools (imports tpicore.model, tpicore.errors, tpicore.tools.gguf_synth and this package). Owns the
GGUF a synthetic config is written as: init.py's float32 draws, generated in row blocks of about
CHUNK_ELEMS and quantized block by block (memory: one stored tensor plus one float32 row block, so a
70B-shaped file is written without its float32 weights ever being in memory or on disk), the synthetic
tokenizer in the metadata, q/k rows in llama.cpp's order. The file is byte for byte what `tpi synth
--dtype f32` followed by tools.gguf_synth.write_gguf writes (quantization works row by row). Must not
touch the inference code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tpicore.errors import TpiError
from tpicore.tools.gguf_synth import (
    ggml_tag_of,
    gguf_tensor_plan,
    llama_cpp_rows,
    quantize,
    tokenizer_metadata,
    write_gguf_file,
)
from tpicore.tools.synth.checkpoint import (
    checkpoint_tensors,
    model_config,
    synthetic_config,
)
from tpicore.tools.synth.init import DTYPES, BlockGenerator
from tpicore.tools.synth.tokenizer import (
    build_tokenizer_json,
    tokenizer_config_dict,
    tokenizer_style,
)


def write_synthetic_gguf(config: dict, out: str | Path, dtype: str = "q8_0", seed: int = 0,
                         types: dict[str, str] | None = None, split_max_tensors: int = 0,
                         force: bool = False) -> list[Path]:
    """Write `config`'s synthetic model as GGUF `out` (2-D weights in `dtype`, per-tensor `types` overrides by
    llama.cpp name, 1-D tensors f32). Returns the files written."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise TpiError(f"--out: {out}: a GGUF file name must end in .gguf")
    if out.exists() and not force:
        raise TpiError(f"--out: {out} exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise TpiError(f"--out: folder {out.parent} does not exist")
    tag, overrides = ggml_tag_of(dtype, types)
    config = synthetic_config(config, "float32")
    cfg = model_config(config)
    shapes = dict(checkpoint_tensors(config))
    plan = gguf_tensor_plan(cfg, shapes, tag, overrides, str(out))
    style = tokenizer_style(config)
    tok_config = tokenizer_config_dict(config)
    tokenizer = tokenizer_metadata(json.loads(build_tokenizer_json(style, config["vocab_size"])), tok_config,
                                   tok_config.get("chat_template"), config["vocab_size"])
    gen = BlockGenerator(DTYPES["f32"], seed)

    def produce(name: str, shape: tuple[int, ...], t: str) -> np.ndarray:
        stored = None
        for r0, r1, block in gen.blocks(name, shape):  # float32 rows r0..r1, quantized as they come
            q = quantize(block, t)
            if stored is None:
                stored = np.empty((shape[0],) + q.shape[1:], dtype=q.dtype)
            stored[r0:r1] = q
        return llama_cpp_rows(cfg, name, stored)

    files = write_gguf_file(out, cfg, tokenizer, out.stem, tag, plan, shapes, produce, split_max_tensors)
    if out.exists() and out not in files:  # --force over a single file now written as a split set
        os.unlink(out)
    return files
