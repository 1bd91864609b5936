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
    and decoders such as Metaspace drop a token's leading space when it comes first. So we decode a
    window that starts one token before the new ones and emit only what the window added beyond its
    prefix; while the window ends in U+FFFD (an incomplete character) we hold the text back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_start = 0  # window start: ids before it are done
        self._read_start = 0  # ids before it have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completed (often "", e.g. mid-character)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_start:self._read_start])
        text = self._decode(self.ids[self._prefix_start:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_start, self._read_start = self._read_start, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (e.g. a trailing incomplete character, shown as U+FFFD)."""
        prefix = self._decode(self.ids[self._prefix_start:self._read_start])
        text = self._decode(self.ids[self._prefix_start:])
        self._prefix_start = self._read_start = len(self.ids)
        return text[len(prefix):]

    def feed(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces for `ids`, then whatever `flush` returns."""
        for token_id in ids:
            piece = self.push(token_id)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail
