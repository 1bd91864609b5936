"""The tokenizer in a GGUF file's metadata against transformers' GGUF tokenizer (AutoTokenizer(gguf_file=...)).

GGUFs are written by tpicore.tools.gguf_synth from HF folders holding our synthetic byte-level BPEs
(`tokenizer.ggml.model = gpt2`, with merges) and a SentencePiece-style BPE with byte fallback (`llama`,
scores and no merges, as Llama 2 files are). Weights are tiny F32 ones: only the metadata matters here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpicore.errors import TpiError
from tpicore.tokenizer import Tokenizer
from tpicore.tools.gguf_synth import write_gguf
from tpicore.tools.synth import presets
from tpicore.tools.synth import tokenizer as synth_tokenizer
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.weights.gguf import gguf_tokenizer, read_header

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello world, the model is small.",
    "  leading spaces, trailing space ",
    "Line one\nLine two\n\n\tTabbed line; numbers 12345 and 3.14!",
    "I don't know - what's 2+2? [INST] is plain text",
]
UNICODE_TEXTS = ["héllo wörld, naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed ascii", "Ελληνικά и кириллица"]
SPECIAL_TEXTS = ["<s>[INST] hi [/INST]</s>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? ünïcode"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "  And goodbye?\n"}],
]
# name -> (vocab size, llama3-style tokenizer?); the tiny vocabularies are ASCII only; spm's size is its own
KINDS = {"llama2-32000": (32000, False), "llama3-4096": (4096, True), "llama2-160": (160, False),
         "llama3-160": (160, True), "spm": (None, False)}


def spm_tokenizer_json() -> tuple[str, int]:
    """A Llama-2-like SentencePiece BPE: <unk> <s> </s>, the 256 byte tokens, then trained pieces (Metaspace,
    byte fallback). Returns (tokenizer.json text, vocabulary size)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(synth_tokenizer.corpus_lines()) + UNICODE_TEXTS, trainer)
    data = json.loads(tok.to_str())
    trained = sorted((i, t) for t, i in data["model"]["vocab"].items() if t not in specials)
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in trained]
    data["model"].update(vocab={t: i for i, t in enumerate(pieces)}, byte_fallback=True, fuse_unk=True)
    tok = Backend.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok.to_str(), len(pieces)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """kind -> (GGUF path in a folder of its own, the HF folder it was written from)."""
    out = {}
    for kind, (vocab, llama3) in KINDS.items():
        spm = None
        if kind == "spm":
            spm, vocab = spm_tokenizer_json()
        cfg = presets.llama_config(hidden=32, layers=1, heads=2, kv_heads=1, ffn=32, vocab=vocab,
                                   rope_scaling=presets.LLAMA3_ROPE_SCALING if llama3 else None)
        hf = write_checkpoint(cfg, tmp_path_factory.mktemp(f"hf-{kind}") / "model")
        if spm is not None:
            (hf / "tokenizer.json").write_text(spm, encoding="utf-8")
            (hf / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "chat_template": synth_tokenizer.LLAMA2_CHAT_TEMPLATE}), encoding="utf-8")
        gguf = write_gguf(hf, tmp_path_factory.mktemp(f"gguf-{kind}") / "model.gguf", "f32")[0]
        out[kind] = (str(gguf), hf)
    return out


def texts_for(kind: str) -> list[str]:
    return TEXTS + SPECIAL_TEXTS + ([] if kind.endswith("-160") else UNICODE_TEXTS)


def both(files, kind: str):
    path = files[kind][0]
    d, f = path.rsplit("/", 1)
    return gguf_tokenizer(path), transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_text_and_specials_match_transformers(files, kind):
    ours, hf = both(files, kind)
    meta = read_header(files[kind][0]).meta
    assert meta["tokenizer.ggml.model"] == ("llama" if kind == "spm" else "gpt2")
    for text in texts_for(kind):
        ids = hf(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    # transformers appends GPT-2's <|endoftext|> to a byte-level vocabulary that lacks it; we do not
    extra = 0 if kind == "spm" else 1
    assert ours.vocab_size + extra == len(hf) and ours.vocab_size == len(meta["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_chat_template_matches_transformers(files, kind):
    ours, hf = both(files, kind)
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == text
        assert ours.encode_chat(messages) == hf.apply_chat_template(messages, tokenize=True,
                                                                    add_generation_prompt=True)["input_ids"]


@pytest.mark.parametrize("kind", ["llama2-32000", "llama3-4096"])
def test_gguf_tokenizer_equals_the_tokenizer_json_it_came_from(files, kind):
    ours, source = gguf_tokenizer(files[kind][0]), Tokenizer.from_dir(files[kind][1])
    for text in TEXTS + UNICODE_TEXTS:
        assert ours.encode(text) == source.encode(text), text
    messages = CONVERSATIONS[1]
    assert ours.encode_chat(messages) == source.encode_chat(messages)


def test_metadata_errors_name_the_field():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []}
    cases = [({**base, "tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model: unsupported 'bert'"),
             ({**base, "tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens: missing"),
             ({k: v for k, v in base.items() if k != "tokenizer.ggml.merges"}, "tokenizer.ggml.merges: missing"),
             ({**base, "tokenizer.ggml.bos_token_id": 7}, "tokenizer.ggml.bos_token_id: 7 is not a token id"),
             ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]},
              "tokenizer.ggml.scores: expected 2 scores")]
    for meta, words in cases:
        with pytest.raises(TpiError, match=r"^x\.gguf: " + words.replace("(", r"\(").replace(")", r"\)")):
            Tokenizer.from_gguf_metadata(meta, "x.gguf")
