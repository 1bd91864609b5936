"""tpicore.tokenizer against HF Transformers' AutoTokenizer on the same files: ids, text, chat templates, BOS."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tpicore.errors import TpiError
from tpicore.tokenizer import StreamDecoder, Tokenizer
from tpicore.tools.synth import presets
from tpicore.tools.synth import tokenizer as synth_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello world, the model is small.",
    "  leading spaces, trailing space ",
    "Line one\nLine two\n\n\tTabbed line; numbers 12345 and 3.14!",
    "I don't know - what's 2+2? [INST] is plain text",
]
# Special tokens written in the text are matched as special tokens (as in HF), so these do not round-trip.
SPECIAL_TEXTS = ["<s>[INST] hi [/INST]</s>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"]
UNICODE_TEXTS = ["héllo wörld, naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed ascii", "Ελληνικά и кириллица"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "  You answer in French.  "}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "  And goodbye?\n"}],
    [{"role": "user", "content": "Quote: \"<b>&</b>\" ünïcode"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again"}],
]

# (name, style, vocab): byte-level BPEs as written by `tpi synth`, plus the ASCII-only tiny ones.
SYNTH_TOKENIZERS = [("llama2-32000", "llama2", 32000), ("llama3-4096", "llama3", 4096),
                    ("llama2-131", "llama2", 131), ("llama3-160", "llama3", 160)]


def write_tokenizer_dir(d: Path, tokenizer_json: str, config: dict | None, jinja: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return d


def synth_tokenizer_config(style: str, vocab: int) -> dict:
    cfg = presets.llama_config(hidden=8, layers=1, heads=1, kv_heads=1, ffn=8, vocab=vocab,
                             rope_scaling=presets.LLAMA3_ROPE_SCALING if style == "llama3" else None)
    assert synth_tokenizer.tokenizer_style(cfg) == style
    return synth_tokenizer.tokenizer_config_dict(cfg)


def metaspace_tokenizer_json() -> str:
    """A SentencePiece-like BPE (Metaspace, as in Llama 2's own tokenizer.json) with <unk>/<s>/</s>."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(list(synth_tokenizer.corpus_lines()) + UNICODE_TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok.to_str()


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {name: write_tokenizer_dir(root / name, synth_tokenizer.build_tokenizer_json(style, vocab),
                                      synth_tokenizer_config(style, vocab))
            for name, style, vocab in SYNTH_TOKENIZERS}
    dirs["metaspace"] = write_tokenizer_dir(root / "metaspace", metaspace_tokenizer_json(),
                                            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                             "chat_template": synth_tokenizer.LLAMA2_CHAT_TEMPLATE})
    return dirs


def load_both(d: Path):
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))


def texts_for(name: str) -> list[str]:
    ascii_only = name in ("llama2-131", "llama3-160")  # tiny alphabets: other characters are not representable
    return TEXTS if ascii_only else TEXTS + UNICODE_TEXTS


@pytest.mark.parametrize("name", [n for n, _, _ in SYNTH_TOKENIZERS] + ["metaspace"])
def test_round_trip_and_ids_match_hf(tok_dirs, name):
    ours, hf = load_both(tok_dirs[name])
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in texts_for(name):
        plain = ours.encode(text, add_special_tokens=False)
        assert plain == hf.encode(text, add_special_tokens=False)
        assert ours.decode(plain) == hf.decode(plain, skip_special_tokens=True)
        if name == "metaspace":  # SentencePiece-style spacing does not round-trip leading double spaces
            continue
        assert ours.decode(plain) == text
        with_bos = ours.encode(text)
        assert with_bos == hf.encode(text)
        assert with_bos == [ours.bos_token_id] + plain  # every synthetic/Llama tokenizer adds exactly BOS
        assert ours.decode(with_bos) == text
        assert ours.decode(with_bos, skip_special_tokens=False) == hf.decode(with_bos, skip_special_tokens=False)
    for text in SPECIAL_TEXTS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)


@pytest.mark.parametrize("name", ["llama2-32000", "llama3-4096", "llama3-160", "metaspace"])
def test_decode_of_arbitrary_ids_matches_hf(tok_dirs, name):
    ours, hf = load_both(tok_dirs[name])
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", ["llama3-4096", "llama2-32000", "llama3-160", "llama2-131", "metaspace"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok_dirs, name, add_generation_prompt):
    ours, hf = load_both(tok_dirs[name])
    for chat in CONVERSATIONS:
        want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        assert got == want
        want_ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=False)
        assert ours.encode_chat(chat, add_generation_prompt=add_generation_prompt) == list(want_ids)
    if name.startswith("llama3"):
        assert got.startswith("<|begin_of_text|><|start_header_id|>")
        assert got.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == add_generation_prompt
    else:
        assert got.startswith("<s>[INST] ") and got.endswith(" [/INST]")


def test_none_fields_are_dropped_like_hf(tok_dirs):
    ours, hf = load_both(tok_dirs["llama3-4096"])
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": None}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_chat_template_error_is_one_tpierror(tok_dirs):
    ours = Tokenizer.from_dir(tok_dirs["llama2-32000"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TpiError, match="Conversation roles must alternate"):
        ours.apply_chat_template(bad)


TEMPLATE_FEATURES = (
    "{{ bos_token }}{% for m in messages %}{{ m | tojson }}|{{ m['content'] | tojson(indent=2) }}\n"
    "{% if loop.last %}{% break %}{% endif %}{% endfor %}{{ eos_token }}{{ unk_token }}"
    "{% if strftime_now('%Y') | int < 2000 %}{{ raise_exception('clock') }}{% endif %}"
    "{% if add_generation_prompt %}>>{% endif %}"
)


@pytest.mark.parametrize("where", ["string", "named-list", "jinja-file"])
def test_template_sources_and_helpers_match_hf(tok_dirs, tmp_path, where):
    tok_json = (tok_dirs["llama2-32000"] / "tokenizer.json").read_text()
    cfg = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "unk_token": "<unk>"}
    jinja = None
    if where == "string":
        cfg["chat_template"] = TEMPLATE_FEATURES
    elif where == "named-list":
        cfg["chat_template"] = [{"name": "tool_use", "template": "wrong"},
                                {"name": "default", "template": TEMPLATE_FEATURES}]
    else:
        cfg["chat_template"] = "overridden by the file"
        jinja = TEMPLATE_FEATURES
    d = write_tokenizer_dir(tmp_path / where, tok_json, cfg, jinja)
    ours, hf = load_both(d)
    chat = CONVERSATIONS[2] + [{"role": "user", "content": "<html> & \"quotes\" ü"}]
    for agp in (True, False):
        assert ours.apply_chat_template(chat, add_generation_prompt=agp) == \
            hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp)


@pytest.mark.parametrize("post_processor_adds_bos", [True, False])
@pytest.mark.parametrize("add_bos_token", [True, False, None])
def test_bos_handling_matches_hf(tok_dirs, tmp_path, post_processor_adds_bos, add_bos_token):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(synth_tokenizer.build_tokenizer_json("llama2", 32000))
    if not post_processor_adds_bos:
        backend.post_processor = None
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    d = write_tokenizer_dir(tmp_path / "t", backend.to_str(), cfg)
    ours, hf = load_both(d)
    for text in TEXTS[:2]:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        # HF 5 lets tokenizer.json decide (it drops add_bos_token when a tokenizer.json exists).
        assert (ids[0] == 1) == post_processor_adds_bos
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", ["llama3-4096", "llama2-32000", "metaspace", "llama2-131"])
def test_stream_decoder_pieces_add_up(tok_dirs, name):
    ours = Tokenizer.from_dir(tok_dirs[name])
    texts = texts_for(name)
    for text in texts + ["".join(texts)]:
        ids = ours.encode(text)
        dec = StreamDecoder(ours)
        pieces = [dec.push(i) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == ours.decode(ids)
        assert name == "metaspace" or ours.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # never a half character
        if len(text) > 20:  # streaming: text shows up before the last id
            assert "".join(pieces[: len(ids) // 2])


def test_stream_decoder_holds_back_partial_utf8(tok_dirs):
    ours = Tokenizer.from_dir(tok_dirs["llama3-4096"])
    ids = ours.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # rare 4-byte character: split into byte tokens
    dec = StreamDecoder(ours)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "🙂"
    assert list(StreamDecoder(ours).feed(ids[:-1])) == ["\ufffd"]  # flushed unfinished character


class WindowStreamDecoder:
    """The streaming decoder StreamDecoder was before it used tokenizers' DecodeStream (kept as the reference):
    decode a window starting one token before the new ones, emit what it added beyond its prefix, hold
    back while the window ends in U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_start = self.read_start = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_start:self.read_start])
        text = self._decode(self.ids[self.prefix_start:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_start, self.read_start = self.read_start, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_start:self.read_start])
        text = self._decode(self.ids[self.prefix_start:])
        self.prefix_start = self.read_start = len(self.ids)
        return text[len(prefix):]


@pytest.mark.parametrize("name", [n for n, _, _ in SYNTH_TOKENIZERS] + ["metaspace"])
def test_stream_decoder_gives_the_window_decoders_pieces(tok_dirs, name):
    """Same pieces, push by push, and the same flush, as the window decoder it replaced: on every test text
    and on random ids (which split UTF-8 characters and put special tokens anywhere), twice in a row."""
    ours = Tokenizer.from_dir(tok_dirs[name])
    rng = random.Random(7)
    seqs = [ours.encode(t) for t in texts_for(name)]
    seqs += [[rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(60)]
    for skip in (True, False):
        new, ref = StreamDecoder(ours, skip), WindowStreamDecoder(ours, skip)
        for ids in seqs:
            assert [new.push(i) for i in ids] == [ref.push(i) for i in ids], ids
            assert new.flush() == ref.flush(), ids


def test_errors_name_the_file(tmp_path, tok_dirs):
    with pytest.raises(TpiError, match=r"tokenizer\.json: not found"):
        Tokenizer.from_dir(tmp_path)
    bad = write_tokenizer_dir(tmp_path / "corrupt", '{"version": "1.0", "model": 12', None)
    with pytest.raises(TpiError, match=r"corrupt/tokenizer\.json: not a valid tokenizer file") as e:
        Tokenizer.from_dir(bad)
    assert "\n" not in str(e.value)
    tok_json = (tok_dirs["llama2-131"] / "tokenizer.json").read_text()
    d = write_tokenizer_dir(tmp_path / "badcfg", tok_json, None)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TpiError, match=r"badcfg/tokenizer_config\.json: cannot read JSON"):
        Tokenizer.from_dir(d)
    d = write_tokenizer_dir(tmp_path / "badbos", tok_json, {"bos_token": "<|nope|>"})
    with pytest.raises(TpiError, match=r"bos_token '<\|nope\|>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_dir(d)
    d = write_tokenizer_dir(tmp_path / "notemplate", tok_json, {"bos_token": "<s>"})
    with pytest.raises(TpiError, match="no chat template"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}])
    d = write_tokenizer_dir(tmp_path / "badtemplate", tok_json, {"chat_template": "{% for %}"})
    with pytest.raises(TpiError, match="Jinja syntax error"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}])
