"""Token generation: prefill + cached decode, sampling, stopping, timing.

Owns the generation loop and the sampler. The model is a `step(ids, pos, all_logits)` function
(single process or the tensor-parallel master), so this file knows nothing about devices, weights or
sockets. Must not print: the caller streams tokens through `on_token`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.cost import elementwise_work
from tpicore.runtime.env import Clock

Step = Callable[[np.ndarray, int, bool], np.ndarray]  # (ids [T], pos, all_logits) -> logits [T or 1, V]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise TpiError(f"--temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise TpiError(f"--top-k: expected >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TpiError(f"--top-p: expected 0 < p <= 1, got {self.top_p}")


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Next token id from last-position logits [V]: greedy at temperature 0, else top-k/top-p sampling."""
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < z.size:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = cum - p[order] < s.top_p  # smallest set whose mass reaches top_p (always >= 1 token)
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)  # decode steps after the first token
    stopped_by: str = "length"  # "eos" | "length"
    logits: list[np.ndarray] = field(default_factory=list)  # rows fed to the model, when dumping

    @property
    def token_latency_s(self) -> float:
        return float(np.mean(self.token_latencies_s)) if self.token_latencies_s else 0.0


def generate(step: Step, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_ids: tuple[int, ...] = (), max_seq: int = 2048, keep_logits: bool = False,
             on_token: Callable[[int], None] | None = None,
             now: Callable[[], float] = time.perf_counter, clock: Clock | None = None) -> Generation:
    """Prefill the prompt, then decode one token at a time from the KV cache.

    `max_new_tokens` counts generated tokens only. With keep_logits, every position's logits are
    kept in order (prompt rows, then one per token fed back): T + n - 1 rows for n new tokens.
    `now` is the clock TTFT and token latencies are read from (the emulator passes a virtual one);
    `clock`, when given, is charged each sampling step's CPU (Clock.cost_s: the logits read once).
    """
    if not prompt_ids:
        raise TpiError("prompt: empty (need at least one token)")
    if max_new_tokens < 1:
        raise TpiError(f"--max-new-tokens: expected >= 1, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens - 1  # the last token is sampled, never fed back
    if total > max_seq:
        raise TpiError(f"context: prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens needs "
                       f"{total} positions, more than the maximum context of {max_seq}")
    rng = np.random.default_rng(sampling.seed)
    out = Generation(prompt_ids=list(prompt_ids))
    t0 = now()
    logits = step(np.asarray(prompt_ids, dtype=np.int64), 0, keep_logits)  # prefill: [T or 1, V]
    if keep_logits:
        out.logits.extend(logits)
    pos = len(prompt_ids)
    while True:
        cpu0 = time.thread_time()
        tok = sample(logits[-1], sampling, rng)
        if clock is not None:
            clock.advance(clock.cost_s(time.thread_time() - cpu0, elementwise_work(logits.shape[-1])))
        t = now()
        if not out.tokens:
            out.ttft_s = t - t0
        else:
            out.token_latencies_s.append(t - t0)
        out.tokens.append(tok)
        if on_token:
            on_token(tok)
        if tok in eos_ids:
            out.stopped_by = "eos"
            break
        if len(out.tokens) >= max_new_tokens:
            break
        t0 = now()
        logits = step(np.asarray([tok], dtype=np.int64), pos, keep_logits)  # decode: [1, V]
        if keep_logits:
            out.logits.extend(logits)
        pos += 1
    return out
