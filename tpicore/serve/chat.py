"""The two ways `tpi chat` reaches a model: a running `tpi serve` over HTTP, or an engine in this process.

Layer: serve. Owns `RemoteChat` (a streaming client of /v1/chat/completions on the standard library's
http.client: server-sent events in, text pieces out; closing the stream early closes the connection, so
the server cancels) and `LocalChat` (the same over an in-process Engine: same request validation, same
KV-cache reuse between turns). Both yield the reply's text pieces, then keep its usage and timings in
`last`. Must not read the terminal or print (tpicore.cli.chat does).
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
from dataclasses import dataclass
from typing import Iterator, Protocol
from urllib.parse import urlsplit

from tpicore.errors import TpiError
from tpicore.runtime.session import GenerateOptions
from tpicore.serve.engine import (
    EVENT_TIMEOUT_S,
    DoneEvent,
    Engine,
    FailedEvent,
    ServeError,
    TokenEvent,
)
from tpicore.serve.protocol import ChatRequest, parse


@dataclass(frozen=True)
class ChatParams:
    max_tokens: int | None = None  # None: what the context leaves
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None

    def body(self, messages: list[dict], stream: bool) -> dict:
        doc = {"messages": messages, "stream": stream, "temperature": self.temperature, "top_p": self.top_p}
        if self.max_tokens is not None:
            doc["max_tokens"] = self.max_tokens
        if self.seed is not None:
            doc["seed"] = self.seed
        return doc


@dataclass(frozen=True)
class ReplyInfo:
    """What `tpi chat --stats` shows of a finished reply (zeros where a server does not say)."""

    completion_tokens: int
    cached_tokens: int
    ttft_ms: float
    tokens_per_s: float

    @classmethod
    def from_json(cls, usage: dict, timings: dict) -> "ReplyInfo":
        details = usage.get("prompt_tokens_details") or {}
        return cls(int(usage.get("completion_tokens") or 0), int(details.get("cached_tokens") or 0),
                   float(timings.get("ttft_ms") or 0.0), float(timings.get("tokens_per_s") or 0.0))


class ChatBackend(Protocol):
    last: ReplyInfo | None

    def stream(self, messages: list[dict], params: ChatParams) -> Iterator[str]: ...

    def close(self) -> None: ...


class RemoteChat:
    """A client of `tpi serve` (or any OpenAI-compatible server) at `url`."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TpiError(f"--url: expected http://HOST:PORT, got {url!r}")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base = parts.path.rstrip("/")
        self.url, self.api_key, self.timeout_s = url, api_key, timeout_s
        self.last: ReplyInfo | None = None

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout_s)

    def stream(self, messages: list[dict], params: ChatParams) -> Iterator[str]:
        conn = self._connect()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.last = None
        try:
            try:
                conn.request("POST", f"{self.base}/v1/chat/completions",
                             json.dumps(params.body(messages, stream=True)), headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise TpiError(f"{self.url}: cannot reach the server ({e})") from None
            if resp.status != 200:
                raise TpiError(f"{self.url}: {resp.status} {_error_message(resp.read())}")
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    raise TpiError(f"{self.url}: {msg['error'].get('message')}")
                if msg.get("usage"):
                    self.last = ReplyInfo.from_json(msg["usage"], msg.get("timings") or {})  # any server's
                for choice in msg.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except socket.timeout:
            raise TpiError(f"{self.url}: no answer within {self.timeout_s:.0f} s") from None
        finally:
            conn.close()  # early close (Ctrl-C): the server cancels the generation

    def close(self) -> None:
        pass


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]


class LocalChat:
    """The model in this process: an Engine over the same options `tpi generate` takes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.last: ReplyInfo | None = None

    @classmethod
    def open(cls, opts: GenerateOptions, ctx_tokens: int | None = None) -> "LocalChat":
        return cls(Engine.open(opts, ctx_tokens, queue_limit=0))

    def stream(self, messages: list[dict], params: ChatParams) -> Iterator[str]:
        try:
            req = parse(ChatRequest, json.dumps(params.body(messages, stream=True)).encode())
            events: queue.Queue = queue.Queue()
            job = self.engine.submit(req.to_gen(self.engine), events.put)
        except ServeError as e:
            raise TpiError(e.message) from None
        self.last = None
        try:
            while True:
                try:
                    ev = events.get(timeout=EVENT_TIMEOUT_S)
                except queue.Empty:
                    raise TpiError(f"no token within {EVENT_TIMEOUT_S:.0f} s") from None
                if isinstance(ev, TokenEvent):
                    if ev.text:
                        yield ev.text
                elif isinstance(ev, DoneEvent):
                    if ev.reply.turn.tail:
                        yield ev.reply.turn.tail
                    t = ev.reply.turn
                    decode_s = sum(t.token_latencies_s)
                    self.last = ReplyInfo(len(t.tokens), t.cached_tokens, ev.reply.ttft_s * 1e3,
                                          len(t.token_latencies_s) / decode_s if decode_s > 0 else 0.0)
                    return
                else:
                    assert isinstance(ev, FailedEvent)
                    raise TpiError(ev.error.message)
        finally:
            job.cancel()  # a no-op when done; stops the engine before its next step otherwise

    def close(self) -> None:
        self.engine.close()
