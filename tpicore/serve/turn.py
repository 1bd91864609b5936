"""One generation on a warm device group, reusing the KV caches of the conversation before it.

Layer: serve. Owns `Conversation`: which token ids the KV caches hold (positions 0..len-1 on every rank),
the longest shared prefix with a new prompt (only the rest is prefilled: a follow-up turn pays for its new
tokens only), the token loop (tpicore.runtime.generate's sampler, one cancellation check before every
step), and `TextStream` (streamed text with `stop` strings held back until they cannot match). Must not
queue requests, speak HTTP or open devices (engine.py, app.py, group.py).

    prompt ids  [p0 .. p_{k-1} | p_k .. p_{T-1}]     cached ids [p0 .. p_{k-1} | c_k ..]   (k: shared prefix)
                 reused (no step) | prefilled at pos k              stale entries past k are overwritten
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tpicore.runtime.generate import Sampling, sample
from tpicore.serve.group import DeviceGroup
from tpicore.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class GenRequest:
    """What one request asks the engine to generate (already tokenized and checked against the context)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    reuse: bool = True  # reuse the KV caches of the shared prefix with the previous conversation


@dataclass
class TurnResult:
    """What one generation produced and how long it took (engine clock: time.perf_counter)."""

    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos or a stop string) | "length" | "cancelled"
    ttft_s: float = 0.0  # from the start of the turn to the first token sampled
    token_latencies_s: list[float] = field(default_factory=list)  # each later token
    tail: str = ""  # text still held back when generation ended (after the last on_token piece)


class TextStream:
    """Text pieces of tokens arriving one at a time, cut at the first stop string; the concatenation of
    the pieces equals the final text. A tail that could still begin a stop string is held back."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of text handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; the text that is now safe to show (often "")."""
        self.text += self.decoder.push(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended (held-back tail, an unfinished character)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if not self.stopped and self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece


class Conversation:
    """The token ids held in the group's KV caches, and generation that reuses them."""

    def __init__(self, group: DeviceGroup, now: Callable[[], float] = time.perf_counter) -> None:
        self.group, self.now = group, now
        self.ids: list[int] = []  # ids whose K/V entries are valid at positions 0..len-1 on every rank

    def warm_up(self) -> None:
        """One step on one token: every rank loads its weights now rather than in the first request."""
        bos = self.group.tokenizer.bos_token_id
        first = bos if bos is not None else 0
        self.ids = []
        self.group.step(np.asarray([first], dtype=np.int64), 0)  # [1] -> logits [1, V]
        self.ids = [first]

    def shared_prefix(self, prompt: tuple[int, ...], reuse: bool) -> int:
        """Prompt tokens whose KV entries can be kept (at least the last one is always recomputed:
        its logits give the first new token)."""
        if not reuse:
            return 0
        k, limit = 0, min(len(self.ids), len(prompt) - 1)
        while k < limit and self.ids[k] == prompt[k]:
            k += 1
        return k

    def generate(self, req: GenRequest, cancel: threading.Event,
                 on_token: Callable[[int, str, float], None]) -> TurnResult:
        """Prefill the new part of the prompt, then decode until eos, a stop string, max_tokens or cancel.
        on_token(id, text piece, latency_s) runs after each token (the pieces plus `tail` make `text`). A
        step failure propagates (the caller closes the group) and leaves no stale claim on the caches."""
        prompt = req.prompt_ids
        k = self.shared_prefix(prompt, req.reuse)
        out = TurnResult(prompt_tokens=len(prompt), cached_tokens=k)
        stream = TextStream(self.group.tokenizer, req.stop)
        rng = np.random.default_rng(req.sampling.seed)
        eos = self.group.eos_ids
        t0 = self.now()
        del self.ids[k:]
        logits = self.group.step(np.asarray(prompt[k:], dtype=np.int64), k)  # prefill: [T - k] -> [1, V]
        self.ids.extend(prompt[k:])
        while True:
            tok = sample(logits[-1], req.sampling, rng)
            t = self.now()
            if out.tokens:
                out.token_latencies_s.append(t - t0)
            else:
                out.ttft_s = t - t0
            out.tokens.append(tok)
            piece = stream.push(tok)
            on_token(tok, piece, t - t0)
            if tok in eos or stream.stopped:
                out.finish_reason = "stop"
                break
            if len(out.tokens) >= req.max_tokens:
                break
            if cancel.is_set():
                out.finish_reason = "cancelled"
                break
            t0 = self.now()
            pos = len(self.ids)
            logits = self.group.step(np.asarray([tok], dtype=np.int64), pos)  # decode: [1] -> [1, V]
            self.ids.append(tok)
        out.tail = stream.finish()
        out.text = stream.text
        return out
