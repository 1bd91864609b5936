"""Privacy of served requests: the capture test of tests/test_parallel.py over `tpi serve`'s HTTP API.
Every frame a worker receives is recorded while chat and completion requests (a follow-up reusing the KV
caches included) are served; none carries token ids, prompt text or reply text."""

from __future__ import annotations

import json

import numpy as np
import openai
from serve_util import synth_tiny
from test_parallel import _recording_worker, frames_per_socket

from tpicore.comm.frame import BOXED
from tpicore.dist import session as parallel
from tpicore.runtime.session import GenerateOptions
from tpicore.serve.engine import Engine
from tpicore.serve.server import ServeOptions, Server
from tpicore.tokenizer import Tokenizer

SECRET_WORDS = "zebra quartz mellifluous"


def test_served_requests_never_reach_the_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path / "cache"))
    model = synth_tiny(tmp_path / "tiny")
    logs = {r: str(tmp_path / f"rank{r}.bin") for r in (1, 2)}
    real_start = parallel.LocalWorkers.start

    def start(self, target, args_per_rank):
        real_start(self, _recording_worker, {r: a + (logs[r],) for r, a in args_per_rank.items()})

    monkeypatch.setattr(parallel.LocalWorkers, "start", start)
    engine = Engine.open(GenerateOptions(model=model, devices=3, allreduce="ring"))
    server = Server(engine, ServeOptions(port=0), "tiny", None).start()
    tok = Tokenizer.from_dir(model)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": f"Tell me about {SECRET_WORDS}"}]
        a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
        reply = a.choices[0].message.content
        follow = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "more please"}]
        b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=follow, max_tokens=6, temperature=0, stream=True) if c.choices)
        assert client.completions.create(model="tiny", prompt=SECRET_WORDS, max_tokens=4).usage.completion_tokens == 4
    finally:
        server.stop()
    prompts = [tok.encode_chat(msgs), tok.encode_chat(follow), tok.encode(SECRET_WORDS)]
    for r, path in logs.items():
        frames, raw = frames_per_socket(path)
        assert len(frames) > 50, len(frames)
        n_float = 0
        for hdr, payload in frames:
            dt = {1: "<f4", 2: "<f2", 3: "<u2", 4: "<i4", 5: "<i8", 6: "u1"}[hdr.dtype]
            if dt in ("<i8", "<i4"):  # only positions may be integers: a contiguous range
                vals = np.frombuffer(payload, dt)
                assert np.array_equal(vals, np.arange(vals[0], vals[0] + len(vals))), vals
            elif dt == "u1" and payload and not hdr.flags & BOXED:  # control / handshake JSON: no ids, no text
                msg = json.loads(payload)
                assert not {"ids", "tokens", "text", "prompt", "messages"} & set(msg), msg
            else:
                n_float += dt == "<f4"
        assert n_float > 0
        for ids in prompts:  # no 4 consecutive prompt ids anywhere in the received bytes
            for i in range(len(ids) - 3):
                for enc in ("<i8", "<i4"):
                    assert np.asarray(ids[i:i + 4], enc).tobytes() not in raw
        for text in (SECRET_WORDS, "mellifluous", reply, b):
            if len(text) >= 4:
                assert text.encode() not in raw
