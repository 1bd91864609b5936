"""Text <-> token ids for a HF-layout model folder, and chat templates, behaving like HF Transformers.

Owns: loading `tokenizer.json` (through the `tokenizers` library) with `tokenizer_config.json` /
`chat_template.jinja` beside it, encode/decode, rendering chat templates with Jinja exactly as HF does,
and incremental (streaming) decoding. Must not touch model weights, configs other than the tokenizer's,
or anything on the network.

Behaviour pinned to HF Transformers 5 (tests compare against `AutoTokenizer`):
- BOS/EOS come from the `tokenizer.json` post-processor. HF 5 drops `add_bos_token`/`add_eos_token`
  from `tokenizer_config.json` whenever a `tokenizer.json` exists, so we read them for information
  only (`Tokenizer.add_bos_token`) and never let them change the ids.
- `clean_up_tokenization_spaces` is ignored: HF 5 skips that clean-up for BPE models, which Llama's are.
- A chat template in `chat_template.jinja` wins over the one in `tokenizer_config.json`; a list of named
  templates in the config resolves to the one named "default".
- The template sees `messages`, `add_generation_prompt`, `tools`, `documents`, and the special tokens
  named in the config (`bos_token`, `eos_token`, `unk_token`, `pad_token`) as strings.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from tpicore.errors import TpiError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(value: Any) -> str | None:
    """A special-token field is either a string or a serialized AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TpiError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise TpiError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data


def _pick_chat_template(value: Any, source: Path) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which we use "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    raise TpiError(f"{source}: chat_template must be a string or a list of {{name, template}}, "
                   f"got {type(value).__name__}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the few settings of `tokenizer_config.json` that change results."""

    def __init__(self, backend: Any, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None,
                 add_bos_token: bool | None = None, chat_template: str | None = None,
                 source: str = "<memory>") -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.source = source
        self.add_bos_token = add_bos_token  # informational, see module docstring
        self.chat_template = chat_template
        # Strings the chat template sees. HF would append a missing one to the vocabulary, beyond the
        # model's embedding: for BOS/EOS, whose ids we use, that is an error in the files.
        self.special_tokens: dict[str, str] = {}
        for field, text in (("bos_token", bos_token), ("eos_token", eos_token),
                            ("unk_token", unk_token), ("pad_token", pad_token)):
            if text is None:
                continue
            if field in ("bos_token", "eos_token") and backend.token_to_id(text) is None:
                raise TpiError(f"{source}: {field} {text!r} is not in the tokenizer's vocabulary")
            self.special_tokens[field] = text
        self._compiled_template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja` if present) from a folder."""
        from tokenizers import Tokenizer as Backend

        folder = Path(path)
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise TpiError(f"{tok_file}: not found (expected a HF `tokenizers` file in the model folder)")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TpiError(f"{tok_file}: not a valid tokenizer file ({reason})") from None

        cfg_file = folder / TOKENIZER_CONFIG_FILE
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        template = _pick_chat_template(cfg.get("chat_template"), cfg_file)
        jinja_file = folder / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TpiError(f"{jinja_file}: cannot read ({e})") from None
        return cls(backend,
                   bos_token=_token_text(cfg.get("bos_token")),
                   eos_token=_token_text(cfg.get("eos_token")),
                   unk_token=_token_text(cfg.get("unk_token")),
                   pad_token=_token_text(cfg.get("pad_token")),
                   add_bos_token=cfg.get("add_bos_token"),
                   chat_template=template,
                   source=str(cfg_file if cfg else tok_file))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str) -> "Tokenizer":
        """The tokenizer a GGUF file's `tokenizer.*` metadata describes, built as HF's GGUF loader builds it.

        `tokenizer.ggml.model` gpt2: byte-level BPE from tokens + merges (split regex from
        `tokenizer.ggml.pre`); llama: SentencePiece-style BPE with byte fallback, merges recovered from the
        scores. Control tokens become special tokens, user-defined ones added tokens; BOS/EOS come from
        the `add_bos_token`/`add_eos_token` flags (llama's default: BOS on). Two deliberate differences
        from HF: we do not append GPT-2's `<|endoftext|>` to a vocabulary that lacks it (that id is past
        the model's embedding), and `add_space_prefix = false` is honoured, as llama.cpp does.
        """
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise TpiError(f"{source}: tokenizer.ggml.tokens: missing or empty (the file has no tokenizer)")
        if kind == "gpt2":
            backend = _gguf_byte_level(meta, tokens, source)
        elif kind == "llama":
            backend = _gguf_sentencepiece(meta, tokens, source)
        else:
            raise TpiError(f"{source}: tokenizer.ggml.model: unsupported {kind!r} (supported: gpt2, llama)")
        _add_gguf_special_tokens(backend, meta, tokens, byte_level=kind == "gpt2")

        def text_of(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            if i is None:
                return None
            if not isinstance(i, int) or not 0 <= i < len(tokens):
                raise TpiError(f"{source}: tokenizer.ggml.{key}: {i!r} is not a token id (0..{len(tokens) - 1})")
            return tokens[i]

        bos, eos = text_of("bos_token_id"), text_of("eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        backend.post_processor = _bos_eos_processor(backend, bos if add_bos else None, eos if add_eos else None)
        template = meta.get("tokenizer.chat_template")
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=text_of("unknown_token_id"),
                   pad_token=text_of("padding_token_id"), add_bos_token=add_bos,
                   chat_template=template if isinstance(template, str) else None, source=source)

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what the model's embedding must cover)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token_id(self) -> int | None:
        tok = self.special_tokens.get("bos_token")
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def eos_token_id(self) -> int | None:
        tok = self.special_tokens.get("eos_token")
        return None if tok is None else self.backend.token_to_id(tok)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- text <-> ids ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`; `add_special_tokens` applies the tokenizer.json post-processor (BOS for Llama)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render `messages` with the model's chat template, as HF's `apply_chat_template(tokenize=False)`.

        The result usually starts with the BOS token text, so encode it with `add_special_tokens=False`
        (or use `encode_chat`) to avoid a second BOS.
        """
        if self.chat_template is None:
            raise TpiError(f"{self.source}: no chat template (expected `chat_template` in "
                           f"{TOKENIZER_CONFIG_FILE} or a {CHAT_TEMPLATE_FILE} file)")
        if not messages:
            raise TpiError("chat: need at least one message")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        # HF drops None-valued keys and hands the template plain copies.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {**self.special_tokens, **template_kwargs}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        import jinja2

        try:
            return self._compiled_template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                                  **context)
        except jinja2.TemplateError as e:
            raise TpiError(f"chat template of {self.source}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a rendered chat, exactly as HF's `apply_chat_template(..., tokenize=True)`."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def _compile_template(template: str) -> Any:
    """Jinja environment configured like HF's (`utils/chat_template_utils.py`)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters; HF's (and so every template author's) does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TpiError(f"chat template: Jinja syntax error at line {e.lineno}: {e.message}") from None


class StreamDecoder:
    """Turn ids arriving one at a time into text pieces whose concatenation equals `decode(all ids)`.

    Decoding a single id is wrong in two ways: a byte-level token can hold half of a UTF-8 character,
    and decoders such as Metaspace drop a token's leading space when it comes first. `tokenizers`'
    DecodeStream handles both (it decodes a window starting before the new ids and holds text back while
    it ends mid-character); on our test vocabularies it gives exactly the pieces our own window decoder
    did (tests/test_tokenizer.py). `flush` returns what is still held back (an unfinished character shows
    as U+FFFD) and starts a new stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first id of the current stream (after the last flush)
        self._emitted = 0  # characters of the current stream's text already returned
        self._stream = self._new_stream()

    def _new_stream(self) -> Any:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completed (often "", e.g. mid-character)."""
        self.ids.append(int(token_id))
        piece = self._stream.step(self.tokenizer.backend, int(token_id)) or ""
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Text still held back at the end (e.g. a trailing incomplete character, shown as U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self._start:], skip_special_tokens=self.skip_special_tokens)
        tail = text[self._emitted:]
        self._start, self._emitted, self._stream = len(self.ids), 0, self._new_stream()
        return tail

    def feed(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces for `ids`, then whatever `flush` returns."""
        for token_id in ids:
            piece = self.push(token_id)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail


# ---- GGUF vocabularies (tokenizer.ggml.*), built as transformers' integrations/gguf does ----

# tokenizer.ggml.pre -> the split regex its merges were learned with (others: GPT-2's ByteLevel regex)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral",
                                                     "smaug-bpe", "dbrx")}
GGUF_PRE_SPLITS.update({"tekken": _TEKKEN_SPLIT, "gpt-4o": _GPT4O_SPLIT, "llama4": _GPT4O_SPLIT})
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _gguf_byte_level(meta: dict[str, Any], tokens: list[str], source: str) -> Any:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    chars = _byte_chars()
    alphabet = set(chars.values())
    # a token outside the byte alphabet (a mislabelled special) is spelled in it, as HF does
    vocab = {t if set(t) <= alphabet else "".join(chars[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise TpiError(f"{source}: tokenizer.ggml.merges: missing (a gpt2 tokenizer needs its merges)")
    backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.decoder = decoders.ByteLevel()
    split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece merges from piece scores (transformers' generate_merges): every split of a piece into
    two pieces, best-scored pieces first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str], source: str) -> Any:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        pairs = [tuple(m.split(" ")) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise TpiError(f"{source}: tokenizer.ggml.scores: expected {len(tokens)} scores (one per token)")
        pairs = _merges_from_scores(tokens, scores)
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=True,
                                 byte_fallback=True, dropout=None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return backend


def _add_gguf_special_tokens(backend: Any, meta: dict[str, Any], tokens: list[str], byte_level: bool) -> None:
    """Control tokens as special tokens, user-defined ones as added tokens (matched whole in text)."""
    from tokenizers import AddedToken

    types = meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(_byte_chars().values())
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == _CONTROL and (not byte_level or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)


def _bos_eos_processor(backend: Any, bos: str | None, eos: str | None) -> Any:
    """TemplateProcessing adding BOS and/or EOS (as HF's update_post_processor writes it)."""
    from tokenizers import processors

    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = " ".join([single] + [f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
