"""The serving engine: one loaded device group, one generation at a time, a bounded FIFO queue in front.

Layer: serve. Owns the engine thread (the only thread that steps the devices), the queue (a request that
finds `queue_limit` others waiting is refused with 429 and a Retry-After estimate), cancellation (a job's
cancel flag is checked before every step, so a client that leaves costs at most the step in flight),
device loss (a failed step closes the group, reaps its processes, fails the request and every queued one
with 503 and keeps the lost ranks for /health), and shutdown. Results go to each job's sink as typed
events, called from the engine thread. Must not speak HTTP or build response bodies (app.py, protocol.py).

    HTTP handlers --submit--> [queue: job, job, ...] --> engine thread: Conversation.generate --> sink(events)
                                 429 when full                 cancel flag checked before each step
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from tpicore.dist.failover import Recovery
from tpicore.errors import TpiError
from tpicore.runtime.report import TimeSplit
from tpicore.runtime.session import GenerateOptions
from tpicore.serve.group import DeviceGroup, DeviceSplit, RankProcess, split_between
from tpicore.serve.metrics import Metrics
from tpicore.serve.turn import Conversation, GenRequest, TurnResult

CLOSE_GRACE_S = 10.0  # shutdown waits this long for the step in flight before closing the group under it
EVENT_TIMEOUT_S = 600.0  # a job's next event (a token, the end) comes within this, or the waiter gives up


class ServeError(TpiError):
    """A request the server cannot serve: HTTP status, message, the request field at fault (400s)."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after_s = status, message, param, retry_after_s


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the text this token made safe to show (often "")
    latency_s: float  # engine time of this token (TTFT for the first)
    made_s: float  # time.perf_counter() when it was handed out


@dataclass(frozen=True)
class Reply:
    """A finished generation with its timings."""

    turn: TurnResult
    queue_s: float  # arrival -> generation started
    ttft_s: float  # arrival -> first token (0 when none was made)
    devices: list[DeviceSplit] = field(default_factory=list)  # per-rank time split of this reply
    recoveries: list[Recovery] = field(default_factory=list)  # devices lost (and recovered from) meanwhile

    def timings_json(self) -> dict:
        t = self.turn
        lat_ms = [round(s * 1e3, 3) for s in t.token_latencies_s]
        decode_s = sum(t.token_latencies_s)
        return {"queue_ms": self.queue_s * 1e3, "ttft_ms": self.ttft_s * 1e3, "prefill_ms": t.ttft_s * 1e3,
                "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens, "new_prompt_tokens":
                t.prompt_tokens - t.cached_tokens, "completion_tokens": len(t.tokens),
                "token_latencies_ms": lat_ms, "tokens_per_s": len(lat_ms) / decode_s if decode_s > 0 else 0.0,
                "devices": [d.to_json() for d in self.devices], "recoveries": [r.to_json() for r in self.recoveries]}


@dataclass(frozen=True)
class DoneEvent:
    reply: Reply


@dataclass(frozen=True)
class FailedEvent:
    error: ServeError


Event = Union[TokenEvent, DoneEvent, FailedEvent]
Sink = Callable[[Event], None]


class Job:
    """One queued or running request. `cancel()` may be called from any thread, any time."""

    def __init__(self, request: GenRequest, sink: Sink) -> None:
        self.request, self.sink = request, sink
        self.arrived_s = time.perf_counter()
        self.cancelled = threading.Event()
        self.produced = 0  # tokens made so far (engine thread)
        self.produced_at_cancel: int | None = None

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.produced_at_cancel = self.produced
            self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the receiving event loop is gone (server shutting down)
            self.cancel()


@dataclass(frozen=True)
class Health:
    status: str  # "ok" | "down" (a device was lost) | "stopping"
    devices: int
    ctx_tokens: int
    busy: bool
    waiting: int
    lost_ranks: tuple[int, ...] = ()
    error: str | None = None
    processes: tuple[RankProcess, ...] = ()

    def to_json(self) -> dict:
        return {"status": self.status, "devices": self.devices, "ctx_tokens": self.ctx_tokens, "busy": self.busy,
                "waiting": self.waiting, "lost_ranks": list(self.lost_ranks), "error": self.error,
                "ranks": [p.to_json() for p in self.processes]}


class Engine:
    def __init__(self, group: DeviceGroup, metrics: Metrics, queue_limit: int = 8) -> None:
        if queue_limit < 0:
            raise TpiError(f"--queue: expected >= 0, got {queue_limit}")
        self.group, self.metrics, self.queue_limit = group, metrics, queue_limit
        self.conversation = Conversation(group)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._down: ServeError | None = None
        self._lost: tuple[int, ...] = ()
        self._job_s = 1.0  # running mean of a job's duration, for Retry-After
        self._splits: list[TimeSplit] = []
        self._thread = threading.Thread(target=self._loop, name="tpi-serve-engine", daemon=True)

    @classmethod
    def open(cls, opts: GenerateOptions, ctx_tokens: int | None = None, queue_limit: int = 8) -> "Engine":
        """Start and load the device group, warm it up, and start the engine thread."""
        group = DeviceGroup.open(opts, ctx_tokens)
        try:
            engine = cls(group, Metrics(opts.devices), queue_limit)
            engine.start()
        except BaseException:
            group.close(failed=True)
            raise
        return engine

    def start(self) -> None:
        self.conversation.warm_up()
        self._splits = self.group.splits()
        self.metrics.devices(split_between([TimeSplit()] * len(self._splits), self._splits))
        self._thread.start()

    # ---- requests ----------------------------------------------------------------------------
    def max_tokens_for(self, prompt_tokens: int, max_tokens: int | None, prompt_field: str,
                       max_field: str = "max_tokens") -> int:
        """max_tokens checked against the context (default: what is left of it); 400 naming the limit."""
        ctx = self.group.ctx_tokens
        if prompt_tokens == 0:
            raise ServeError(400, f"{prompt_field}: empty (need at least one token)", prompt_field)
        if prompt_tokens >= ctx:
            raise ServeError(400, f"{prompt_field}: {prompt_tokens} tokens do not fit the context of {ctx} tokens "
                             f"(prompt + max_tokens must fit; the server's --ctx-size)", prompt_field)
        if max_tokens is None:
            return ctx - prompt_tokens
        if prompt_tokens + max_tokens > ctx:
            raise ServeError(400, f"{max_field}: {prompt_tokens} prompt tokens + {max_tokens} new tokens exceed the "
                             f"context of {ctx} tokens (the server's --ctx-size)", max_field)
        return max_tokens

    def submit(self, request: GenRequest, sink: Sink) -> Job:
        """Queue a request; 503 when the group is down or stopping, 429 when the queue is full."""
        with self._cond:
            if self._down is not None:
                raise self._down
            if self._closed:
                raise ServeError(503, "the server is shutting down")
            waiting = sum(not j.cancelled.is_set() for j in self._queue)
            if waiting >= self.queue_limit and (self._running is not None or waiting > 0):
                retry = max(1, math.ceil(self._job_s * (waiting + 1)))
                raise ServeError(429, f"queue full: {waiting} requests are waiting (the server's --queue "
                                 f"{self.queue_limit}); retry in about {retry} s", retry_after_s=retry)
            job = Job(request, sink)
            self._queue.append(job)
            self.metrics.waiting.set(len(self._queue))
            self._cond.notify()
        return job

    def health(self) -> Health:
        with self._cond:
            status = "down" if self._down is not None else "stopping" if self._closed else "ok"
            return Health(status, self.group.devices, self.group.ctx_tokens, self._running is not None,
                          sum(not j.cancelled.is_set() for j in self._queue), self._lost,
                          self._down.message if self._down is not None else None,
                          tuple(self.group.processes()) if not self.group.closed else ())

    # ---- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        beat_s = self.group.heartbeat_s
        while True:
            with self._cond:
                idle = False
                while not self._queue and not self._closed and not idle:
                    idle = not self._cond.wait(beat_s)  # timed out: ping the devices
                if idle and not self._queue and not self._closed:
                    job = None
                elif self._closed:
                    pending = list(self._queue)
                    self._queue.clear()
                    break
                else:
                    job = self._running = self._queue.popleft()
                    self.metrics.waiting.set(len(self._queue))
                    self.metrics.busy.set(1)
            if job is None:
                self._beat()
                continue
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self.metrics.busy.set(0)
        for job in pending:
            job.emit(FailedEvent(ServeError(503, "the server is shutting down")))

    def _beat(self) -> None:
        """Idle or at a request boundary: ping the devices (a lost one is recovered now, standby ones are
        admitted up to --devices); a group that cannot go on is marked down."""
        if self._down is not None or self.group.closed:
            return
        seen = len(self.group.recoveries())
        try:
            self.group.heartbeat()
        except Exception as e:
            self._lose(e)
            return
        self._note_recoveries(self.group.recoveries()[seen:])

    def _note_recoveries(self, new: list[Recovery]) -> None:
        m = self.metrics
        for r in new:
            m.recoveries.inc()
            m.devices_lost.inc(len(r.lost))
            m.recovery_s.observe(r.total_s)
        if new:
            m.devices_serving.set(self.group.devices)
            m.devices_up.set(1 if self.group.devices >= self.group.target_devices else 0)
            self._splits = self.group.splits()  # the new group's devices count from zero

    def _run(self, job: Job) -> None:
        self._beat()  # a request boundary
        started = time.perf_counter()
        queue_s = started - job.arrived_s
        if self._down is not None:
            job.emit(FailedEvent(self._down))
            return
        if job.cancelled.is_set():  # left while waiting: nothing to compute
            nothing = TurnResult(len(job.request.prompt_ids), finish_reason="cancelled")
            job.emit(DoneEvent(Reply(nothing, queue_s, 0.0)))
            return
        self.metrics.queue_wait.observe(queue_s)
        first_s = 0.0  # arrival -> first token

        def on_token(tok: int, piece: str, latency_s: float) -> None:
            nonlocal first_s
            job.produced += 1
            if job.produced == 1:
                first_s = time.perf_counter() - job.arrived_s
                self.metrics.ttft.observe(first_s)
            else:
                self.metrics.token_latency.observe(latency_s)
            job.emit(TokenEvent(tok, piece, latency_s, time.perf_counter()))

        seen = len(self.group.recoveries())
        try:
            turn = self.conversation.generate(job.request, job.cancelled, on_token)
            recovered = self.group.recoveries()[seen:]
            after = self.group.splits()
        except Exception as e:  # a device failed beyond recovery (or a bug): this group cannot serve any more
            job.emit(FailedEvent(self._lose(e)))
            return
        if job.produced_at_cancel is not None:
            self.metrics.tokens_after_cancel.inc(job.produced - job.produced_at_cancel)
        if recovered:  # the devices of the new group count from when it formed
            self._note_recoveries(recovered)
            self._splits = [TimeSplit()] * len(after)
        devices = split_between(self._splits, after)
        self._splits = after
        m = self.metrics
        m.devices(devices)
        m.prompt_tokens.inc(turn.prompt_tokens)
        m.cached_tokens.inc(turn.cached_tokens)
        m.completion_tokens.inc(len(turn.tokens))
        self._job_s = 0.8 * self._job_s + 0.2 * (time.perf_counter() - started)
        job.emit(DoneEvent(Reply(turn, queue_s, first_s, devices, recovered)))

    def _lose(self, err: Exception) -> ServeError:
        """Mark the group down, name the lost ranks, reap every device process, fail the queue."""
        if not isinstance(err, TpiError):
            traceback.print_exc(file=sys.stderr)
        lost = tuple(self.group.lost_ranks(err))
        where = f"lost rank {', '.join(map(str, lost))}" if lost else "failed"
        down = ServeError(503, f"device group {where}: {err}; restart `tpi serve`")
        print(f"error: {down}", file=sys.stderr)
        with self._cond:
            self._down, self._lost = down, lost
            pending = list(self._queue)
            self._queue.clear()
            self.metrics.waiting.set(0)
        self.metrics.devices_up.set(0)
        self.group.close(failed=True)
        for job in pending:
            job.emit(FailedEvent(down))
        return down

    # ---- shutdown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Refuse new requests and cancel every queued and running one (returns at once; signal-safe)."""
        with self._cond:
            self._closed = True
            for job in [*self._queue, *([self._running] if self._running else [])]:
                job.cancel()
            self._cond.notify_all()

    def close(self) -> None:
        """stop(), let the step in flight finish (up to CLOSE_GRACE_S), then stop and reap every device."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(CLOSE_GRACE_S)
        if self._thread.is_alive():  # a step still in flight: closing the group under it ends it
            self.group.close(failed=True)
            self._thread.join(CLOSE_GRACE_S)
        self.group.close(failed=self._down is not None)
