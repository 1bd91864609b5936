"""The serving engine in process, on one device of the tiny synthetic model: KV-cache reuse equals full
recomputation, stop strings, the queue, cancellation, context limits."""

from __future__ import annotations

import queue
import threading

import pytest
from serve_util import synth_tiny

from tpicore.runtime.generate import Sampling
from tpicore.runtime.session import GenerateOptions
from tpicore.serve.engine import DoneEvent, Engine, ServeError, TokenEvent
from tpicore.serve.turn import GenRequest, TextStream
from tpicore.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth_tiny(tmp_path_factory.mktemp("serve-engine") / "tiny")


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine.open(GenerateOptions(model=model), queue_limit=1)
    yield eng
    eng.close()


def run(engine: Engine, req: GenRequest) -> tuple[list[TokenEvent], DoneEvent]:
    events: queue.Queue = queue.Queue()
    engine.submit(req, events.put)
    tokens = []
    while True:
        ev = events.get(timeout=60)
        if isinstance(ev, TokenEvent):
            tokens.append(ev)
        else:
            assert isinstance(ev, DoneEvent), ev
            return tokens, ev


def test_text_stream_cuts_at_stop_strings(model):
    tok = Tokenizer.from_dir(model)
    text = "hello world, hello there"
    ids = tok.encode(text, add_special_tokens=False)
    s = TextStream(tok, (", h", "zz"))
    pieces = []
    for t in ids:
        pieces.append(s.push(t))
        if s.stopped:
            break
    pieces.append(s.finish())
    assert "".join(pieces) == "hello world" == s.text and s.stopped
    s = TextStream(tok, ("xyz",))  # never matches: everything comes out, the held-back tail at the end
    assert "".join([s.push(t) for t in ids] + [s.finish()]) == text and not s.stopped


def test_reuse_equals_recomputation(engine, model):
    tok = Tokenizer.from_dir(model)
    first = tuple(tok.encode_chat([{"role": "user", "content": "one two three"}]))
    toks, done = run(engine, GenRequest(first, 6))
    a = done.reply.turn
    assert [t.token_id for t in toks] == a.tokens and len(a.tokens) == 6
    follow = first + tuple(a.tokens) + tuple(tok.encode(" four five", add_special_tokens=False))
    _, reused = run(engine, GenRequest(follow, 6))
    _, fresh = run(engine, GenRequest(follow, 6, reuse=False))
    assert reused.reply.turn.cached_tokens == len(first) + len(a.tokens) - 1  # the last fed token is kept too
    assert fresh.reply.turn.cached_tokens == 0
    assert reused.reply.turn.tokens == fresh.reply.turn.tokens
    shorter = follow[:len(first) - 2] + (7, 8)  # diverges inside the cached prefix: the rest is overwritten
    _, d = run(engine, GenRequest(shorter, 3))
    _, e = run(engine, GenRequest(shorter, 3, reuse=False))
    assert d.reply.turn.cached_tokens == len(first) - 2 and d.reply.turn.tokens == e.reply.turn.tokens
    assert len(d.reply.devices) == 1 and d.reply.devices[0].compute_s > 0


def test_queue_limit_and_cancel(engine):
    started, release = threading.Event(), threading.Event()
    events: queue.Queue = queue.Queue()

    def slow_sink(ev):  # holds the engine thread on the first token until released
        events.put(ev)
        if isinstance(ev, TokenEvent) and not started.is_set():
            started.set()
            release.wait(30)

    running = engine.submit(GenRequest((1, 5, 9), 50, Sampling()), slow_sink)
    assert started.wait(30)
    waiting = engine.submit(GenRequest((1, 5), 3), lambda ev: None)
    with pytest.raises(ServeError) as info:
        engine.submit(GenRequest((1, 5), 3), lambda ev: None)
    assert info.value.status == 429 and info.value.retry_after_s >= 1
    waiting.cancel()  # a cancelled waiter frees its place
    third: queue.Queue = queue.Queue()
    engine.submit(GenRequest((1, 6), 2), third.put)
    running.cancel()
    release.set()
    while not isinstance(ev := events.get(timeout=30), DoneEvent):
        pass
    assert ev.reply.turn.finish_reason == "cancelled" and len(ev.reply.turn.tokens) <= 2  # the step in flight
    while not isinstance(ev := third.get(timeout=30), DoneEvent):
        pass
    assert len(ev.reply.turn.tokens) == 2
    assert engine.metrics.registry.get_sample_value("tpi_tokens_after_cancel_total") <= 1


def test_context_limits(engine):
    ctx = engine.group.ctx_tokens
    assert engine.max_tokens_for(10, None, "prompt") == ctx - 10
    with pytest.raises(ServeError, match=f"prompt: {ctx} tokens do not fit the context of {ctx} tokens"):
        engine.max_tokens_for(ctx, None, "prompt")
    with pytest.raises(ServeError, match=f"max_completion_tokens: 10 prompt tokens \\+ {ctx} new tokens exceed"):
        engine.max_tokens_for(10, ctx, "messages", "max_completion_tokens")


def test_closed_engine_refuses(model):
    eng = Engine.open(GenerateOptions(model=model))
    eng.close()
    with pytest.raises(ServeError) as info:
        eng.submit(GenRequest((1, 2), 2), lambda ev: None)
    assert info.value.status == 503 and "shutting down" in info.value.message
    assert eng.health().status == "stopping"
