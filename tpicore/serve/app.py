"""The HTTP side of `tpi serve`: a Starlette app with the OpenAI-compatible routes, the page and the probes.

Layer: serve. Owns the routes, Bearer auth (every route but `/` and `/health` when an API key is set),
turning engine events into JSON or server-sent events, and noticing a client that left (its job is
cancelled: the engine stops before its next step). Headers of a generation go out with its first token,
so a request that fails before that (queue full, device lost during prefill) gets a real status code.
Must not step devices or tokenize outside protocol.py's records.

    GET  /                      the chat page (static/index.html)
    GET  /health                200 {"status": "ok", ...} | 503 {"status": "down", "lost_ranks": [2], ...}
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model
    POST /v1/chat/completions   chat (chat template), stream or not
    POST /v1/completions        plain text or token ids, stream or not
"""

from __future__ import annotations

import asyncio
import hmac
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tpicore.serve.engine import (
    EVENT_TIMEOUT_S,
    DoneEvent,
    Engine,
    Event,
    FailedEvent,
    Job,
    ServeError,
    TokenEvent,
)
from tpicore.serve.metrics import CONTENT_TYPE
from tpicore.serve.protocol import (
    Bodies,
    ChatRequest,
    CompletionRequest,
    error_body,
    finish_reason,
    parse,
    sse,
)

MAX_BODY_BYTES = 8 << 20  # a request body over this gets 413 (read no further)


async def read_body(request: Request) -> bytes:
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY_BYTES:
            raise ServeError(413, f"request body: over {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_disconnect(receive: Receive) -> None:
    """Returns once the client has gone (the request body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def next_event(events: asyncio.Queue, job: Job, receive: Receive) -> Event | None:
    """The job's next event, or None (and the job cancelled) if the client leaves first."""
    getter = asyncio.ensure_future(events.get())
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({getter, watcher}, timeout=EVENT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if getter in done:
        return getter.result()
    getter.cancel()
    job.cancel()
    if not done:
        return FailedEvent(ServeError(504, f"no token within {EVENT_TIMEOUT_S:.0f} s"))
    return None


class EventStream:
    """An ASGI response streaming one job as server-sent events; a disconnect cancels the job."""

    def __init__(self, job: Job, events: asyncio.Queue, bodies: Bodies, first: Event, on_end) -> None:
        self.job, self.events, self.bodies, self.first, self.on_end = job, events, bodies, first, on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        status: int | str = "cancelled"
        try:
            done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done and pump.exception() is None:
                status = pump.result()
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            if status == "cancelled":
                self.job.cancel()
            self.on_end(status)

    async def _pump(self, send: Send) -> int | str:
        """Write events as they come; events that queued up meanwhile go out in one write. The final chunk's
        timings add `delivery_ms`: per token, engine sampled it -> its chunk handed to the socket."""
        b, ev, first = self.bodies, self.first, True
        delivery_ms: list[float] = []
        while True:
            batch = [ev]
            while not self.events.empty():
                batch.append(self.events.get_nowait())
            tokens = [e for e in batch if isinstance(e, TokenEvent)]
            end = batch[-1] if not isinstance(batch[-1], TokenEvent) else None  # the end is always last
            if tokens:
                body = b"".join(sse(b.chunk(e.text, first=first and i == 0)) for i, e in enumerate(tokens))
                first = False
                await send({"type": "http.response.body", "body": body, "more_body": True})
                now = time.perf_counter()
                delivery_ms += [round((now - e.made_s) * 1e3, 3) for e in tokens]
            if isinstance(end, DoneEvent):
                reply = end.reply
                parts = [b.chunk(reply.turn.tail, first=first)] if reply.turn.tail else []
                parts += [b.chunk("", reason=finish_reason(reply)), b.last(reply, delivery_ms), "[DONE]"]
                await send({"type": "http.response.body", "body": b"".join(map(sse, parts)), "more_body": False})
                return "cancelled" if reply.turn.finish_reason == "cancelled" else 200
            if isinstance(end, FailedEvent):  # after the first token the status line is gone: say it in the stream
                body = sse(error_body(end.error)) + sse("[DONE]")
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return end.error.status
            try:
                ev = await asyncio.wait_for(self.events.get(), EVENT_TIMEOUT_S)
            except asyncio.TimeoutError:
                ev = FailedEvent(ServeError(504, f"no token within {EVENT_TIMEOUT_S:.0f} s"))


class ServeApp:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None) -> None:
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.metrics = engine.metrics
        self.created = int(time.time())
        self.page = (resources.files("tpicore.serve") / "static" / "index.html").read_text()

    def build(self) -> Starlette:
        return Starlette(routes=[
            Route("/", self.index),
            Route("/health", self.health),
            Route("/metrics", self.metrics_text),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ])

    # ---- helpers -------------------------------------------------------------------------------
    def _denied(self, request: Request, endpoint: str) -> Response | None:
        if self.api_key is None:
            return None
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return None
        what = "missing API key" if not got else "wrong API key"
        return self._error(endpoint, ServeError(401, f"{what}: send `Authorization: Bearer <key>` (the server's "
                                                     f"--api-key-file)"), {"WWW-Authenticate": "Bearer"})

    def _error(self, endpoint: str, err: ServeError, headers: dict[str, str] | None = None) -> Response:
        self.metrics.request(endpoint, err.status)
        hdrs = dict(headers or {})
        if err.retry_after_s is not None:
            hdrs["Retry-After"] = str(err.retry_after_s)
        return JSONResponse(error_body(err), status_code=err.status, headers=hdrs)

    # ---- routes --------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def health(self, request: Request) -> Response:
        h = self.engine.health()
        return JSONResponse({"model": self.model_name, **h.to_json()}, status_code=200 if h.status == "ok" else 503)

    async def metrics_text(self, request: Request) -> Response:
        denied = self._denied(request, "metrics")
        return denied or Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        denied = self._denied(request, "models")
        if denied:
            return denied
        h = self.engine.health()
        self.metrics.request("models", 200)
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "tpicore",
            "meta": {"devices": h.devices, "ctx_tokens": h.ctx_tokens}}]})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", ChatRequest)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", CompletionRequest)

    async def _generate(self, request: Request, endpoint: str,
                        record: type[ChatRequest] | type[CompletionRequest]) -> Response:
        denied = self._denied(request, endpoint)
        if denied:
            return denied
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            req = parse(record, await read_body(request))
            gen = req.to_gen(self.engine)
            job = self.engine.submit(gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except ServeError as e:
            return self._error(endpoint, e)
        bodies = Bodies(record is ChatRequest, self.model_name)
        ev = await next_event(events, job, request.receive)
        if req.stream:
            if ev is None:
                self.metrics.request(endpoint, "cancelled")
                return Response(status_code=499)
            if isinstance(ev, FailedEvent):
                return self._error(endpoint, ev.error)
            return EventStream(job, events, bodies, ev, lambda status: self.metrics.request(endpoint, status))
        while isinstance(ev, TokenEvent):
            ev = await next_event(events, job, request.receive)
        if ev is None:
            self.metrics.request(endpoint, "cancelled")
            return Response(status_code=499)
        if isinstance(ev, FailedEvent):
            return self._error(endpoint, ev.error)
        self.metrics.request(endpoint, 200)
        return JSONResponse(bodies.full(ev.reply))
