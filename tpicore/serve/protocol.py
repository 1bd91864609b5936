"""The OpenAI-compatible wire format: request records (validated, 400 naming the field) and response bodies.

Layer: serve. Owns `ChatRequest` / `CompletionRequest` (the fields we honour; unknown ones are ignored as
OpenAI clients send extras, and unsupported non-default values such as n > 1 are refused), turning them
into a GenRequest (chat template, tokenization, context check via the engine), and the JSON of responses,
stream chunks, usage and errors. Extensions: `top_k`, `cache_prompt` (false: prefill the whole prompt),
and a `timings` object (per-token latency, per-device compute/comm/load split) next to `usage`.
Must not run generations or touch sockets.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tpicore.errors import TpiError
from tpicore.runtime.generate import Sampling
from tpicore.schema import (
    Choice,
    Flag,
    Int,
    Invalid,
    OptInt,
    check,
    error_parts,
    is_int,
    is_number,
)
from tpicore.serve.engine import Engine, Reply, ServeError
from tpicore.serve.turn import GenRequest

MAX_STOP_STRINGS = 4


def _number(lo: float, hi: float, lo_open: bool = False):
    def fn(value: Any) -> float | None:
        if value is None:
            return None
        ok = is_number(value) and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            bound = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise Invalid(f"must be a number in {bound}, got {value!r}")
        return float(value)

    return Annotated[float | None, check(fn)]


def _content(value: Any) -> str:
    """A message's content: a text, or a list of {"type": "text", "text": ...} parts (joined)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise Invalid(f"only text parts are supported ({{\"type\": \"text\", \"text\": ...}}), got {part!r}",
                              field=f"[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise Invalid(f"expected a text or a list of text parts, got {value!r}")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in items):
        raise Invalid(f"expected a non-empty text or a list of up to {MAX_STOP_STRINGS}, got {value!r}")
    return tuple(items)


def _one(value: Any) -> int:
    if value is not None and value != 1:
        raise Invalid(f"only 1 choice per request is supported, got {value!r}")
    return 1


def _zero(value: Any) -> float:
    if value is not None and not (is_number(value) and value == 0):
        raise Invalid(f"not supported (only 0), got {value!r}")
    return 0.0


def _unsupported(value: Any) -> None:
    if value not in (None, False, ""):
        raise Invalid(f"not supported, got {value!r}")
    return None


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A text, a list of token ids, or a list holding one text."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0]:
        return value[0]
    if isinstance(value, list) and value and all(is_int(t) for t in value):
        return tuple(value)
    raise Invalid(f"expected a non-empty text or a list of token ids, got {value!r}")


class ApiRecord(BaseModel):
    """A request record: frozen, extras ignored (clients send fields we do not use)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Message(ApiRecord):
    role: Choice("system", "developer", "user", "assistant", "tool")
    content: Annotated[str, check(_content)] = ""


class StreamOptions(ApiRecord):
    include_usage: Flag = True  # usage is always sent in the last chunk


class _Common(ApiRecord):
    model: str | None = None
    max_tokens: OptInt(1) = None
    temperature: _number(0.0, 2.0) = None  # None: OpenAI's default, 1
    top_p: _number(0.0, 1.0, lo_open=True) = None
    top_k: Int(0) = 0
    seed: OptInt(0) = None
    stop: Annotated[tuple[str, ...], check(_stop)] = ()
    stream: Flag = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, check(_one)] = 1
    presence_penalty: Annotated[float, check(_zero)] = 0.0
    frequency_penalty: Annotated[float, check(_zero)] = 0.0
    cache_prompt: Flag = True

    def sampling(self) -> Sampling:
        return Sampling(1.0 if self.temperature is None else self.temperature, self.top_k,
                        1.0 if self.top_p is None else self.top_p, self.seed)


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: OptInt(1) = None

    def to_gen(self, engine: Engine) -> GenRequest:
        """The chat template applied, tokenized, max_tokens checked against the context."""
        tokenizer = engine.group.tokenizer
        if not self.messages:
            raise ServeError(400, "messages: need at least one message", "messages")
        try:
            ids = tokenizer.encode_chat([m.model_dump() for m in self.messages], add_generation_prompt=True)
        except TpiError as e:
            raise ServeError(400, f"messages: {e}", "messages") from None
        newer = self.max_completion_tokens is not None
        n = engine.max_tokens_for(len(ids), self.max_completion_tokens if newer else self.max_tokens, "messages",
                                  "max_completion_tokens" if newer else "max_tokens")
        return GenRequest(tuple(ids), n, self.sampling(), self.stop, self.cache_prompt)


class CompletionRequest(_Common):
    prompt: Annotated[str | tuple[int, ...], check(_prompt)]
    max_tokens: OptInt(1) = 16  # the legacy endpoint's default
    echo: Annotated[None, check(_unsupported)] = None
    suffix: Annotated[None, check(_unsupported)] = None

    def to_gen(self, engine: Engine) -> GenRequest:
        """The text tokenized as `tpi generate` does (BOS added), or the ids checked against the vocabulary."""
        vocab_size = engine.group.vocab_size
        if isinstance(self.prompt, str):
            ids = engine.group.tokenizer.encode(self.prompt, add_special_tokens=True)
        else:
            bad = [t for t in self.prompt if not 0 <= t < vocab_size]
            if bad:
                raise ServeError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                                 "prompt")
            ids = list(self.prompt)
        n = engine.max_tokens_for(len(ids), self.max_tokens, "prompt")
        return GenRequest(tuple(ids), n, self.sampling(), self.stop, self.cache_prompt)


def parse(record: type[ApiRecord], body: bytes) -> Any:
    """A request body as `record`; ServeError 400 naming the field (or the body) otherwise."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(400, f"request body: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ServeError(400, f"request body: expected a JSON object, got {type(doc).__name__}")
    try:
        return record.model_validate(doc)
    except ValidationError as e:
        path, what = error_parts(e)
        raise ServeError(400, f"{path}: {what}" if path else what, path or None) from None


# ---- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def error_body(err: ServeError) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        err.status, "invalid_request_error" if err.status < 500 else "server_error")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.status}}


def finish_reason(reply: Reply) -> str:
    return "stop" if reply.turn.finish_reason == "cancelled" else reply.turn.finish_reason


def usage(reply: Reply) -> dict:
    t = reply.turn
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": len(t.tokens),
            "total_tokens": t.prompt_tokens + len(t.tokens),
            "prompt_tokens_details": {"cached_tokens": t.cached_tokens}}


class Bodies:
    """Response bodies of one request: chat ("chat.completion") or legacy ("text_completion")."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, reply: Reply) -> dict:
        text = reply.turn.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                  if self.chat else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = finish_reason(reply)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(reply), "timings": reply.timings_json()}

    def chunk(self, text: str, first: bool = False, reason: str | None = None) -> dict:
        if self.chat:
            if first:
                delta = {"role": "assistant", "content": text}
            else:
                delta = {"content": text} if text or not reason else {}  # the finishing chunk: {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    def last(self, reply: Reply, delivery_ms: list[float]) -> dict:
        """The final chunk: no choices, the usage and the timings of the whole reply (with the stream's
        per-token delivery: engine -> socket)."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        timings = {**reply.timings_json(), "delivery_ms": delivery_ms}
        return {**self._head(obj), "choices": [], "usage": usage(reply), "timings": timings}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
