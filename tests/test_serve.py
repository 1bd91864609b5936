"""`tpi serve` through the real `openai` client: chat and completions, streamed and not, on 2 and 3 devices;
greedy output equals `tpi generate`; conversation reuse; 400s naming the field; `tpi chat` against it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serve_util import LiveServer, generate_json, pid_alive, synth_tiny, tpi_env

PROMPT = "Hello there, tiny model"
NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    return synth_tiny(base / "tiny"), tpi_env(base / "cache"), base


@pytest.fixture(scope="module", params=[2, 3], ids=["2dev", "3dev"])
def server(request, tiny):
    model, env, base = tiny
    n = request.param
    srv = LiveServer(["--model", model, "--devices", str(n)], env, base / f"serve-{n}.log")
    srv.devices = n
    pids = srv.pids()
    assert len(pids) == n
    yield srv
    assert srv.stop() == 0, srv.log_path.read_text()
    assert not [p for p in pids if pid_alive(p)], "processes left behind"
    assert "every device process has exited" in srv.log_path.read_text()


@pytest.fixture(scope="module")
def reference(tiny):
    """`tpi generate` greedy outputs per device count (chat and plain)."""
    model, env, _ = tiny
    cache: dict = {}

    def get(n: int, chat: bool) -> dict:
        if (n, chat) not in cache:
            cache[n, chat] = generate_json(model, n, PROMPT, NEW, env, chat=chat)
        return cache[n, chat]

    return get


def test_chat_equals_generate(server, reference):
    ref = reference(server.devices, chat=True)
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=NEW,
                                       temperature=0, extra_body={"cache_prompt": False})
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ("stop" if ref["stopped_by"] == "eos" else "length")
    assert r.usage.prompt_tokens == ref["prompt_tokens"] and r.usage.completion_tokens == len(ref["tokens"])
    # streamed: the same text in chunks, and a last chunk with the usage
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=NEW, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason is None) == len(ref["tokens"])
    last = chunks[-1]
    assert not last.choices and last.usage.completion_tokens == len(ref["tokens"])
    assert last.usage.prompt_tokens_details.cached_tokens == ref["prompt_tokens"] - 1  # the same prompt again
    timings = last.model_extra["timings"]
    assert len(timings["devices"]) == server.devices and len(timings["token_latencies_ms"]) == len(ref["tokens"]) - 1


def test_completions_equal_generate(server, reference):
    ref = reference(server.devices, chat=False)
    client = server.client()
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == ref["text"] and r.usage.prompt_tokens == ref["prompt_tokens"]
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == len(ref["tokens"])
    ids = client.completions.create(model="tiny", prompt=[1, 5, 9, 30], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3


def test_follow_up_reuses_the_conversation(server):
    client = server.client()
    first = [{"role": "user", "content": "Tell me about edge devices"}]
    a = client.chat.completions.create(model="tiny", messages=first, max_tokens=6, temperature=0)
    follow = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And more?"}]
    b = client.chat.completions.create(model="tiny", messages=follow, max_tokens=6, temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert a.usage.prompt_tokens <= cached < b.usage.prompt_tokens
    assert b.model_extra["timings"]["new_prompt_tokens"] == b.usage.prompt_tokens - cached
    # reuse changes nothing but the work: the same turn computed from scratch gives the same reply
    c = client.chat.completions.create(model="tiny", messages=follow, max_tokens=6, temperature=0,
                                       extra_body={"cache_prompt": False})
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    assert c.choices[0].message.content == b.choices[0].message.content


def test_sampling_seed_and_stop(server):
    client = server.client()
    msgs = [{"role": "user", "content": PROMPT}]
    kw = dict(model="tiny", messages=msgs, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same sample
    greedy = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[3:5]
    assert stop and text.find(stop) >= 0
    cut = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.find(stop)]


@pytest.mark.parametrize("body,status,names", [
    (b'{"messages": [{"role": "user", "content": "hi"}', 400, "request body: not valid JSON"),
    (b'[1, 2]', 400, "request body: expected a JSON object"),
    (b'{"model": "tiny"}', 400, "messages: "),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role: expected one of"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 400, "max_tokens: must be"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "temperature: must be"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n: only 1 choice"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream: expected true or false"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}', 400,
     "max_tokens: 17 prompt tokens + 300 new tokens exceed the context of 256 tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 300}]}).encode(), 400,
     "do not fit the context of 256 tokens"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}', 413, "request body: over 8 MiB"),
])
def test_bad_requests_name_the_field(server, body, status, names):
    got, raw, _ = server.post("/v1/chat/completions", body)
    err = json.loads(raw)["error"]
    assert got == status and names in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_bad_completion_prompt(server):
    got, raw, _ = server.post("/v1/completions", b'{"prompt": [1, 999], "max_tokens": 2}')
    message = json.loads(raw)["error"]["message"]
    assert got == 400 and "prompt: token id 999 is outside the vocabulary (0..130)" in message
    got, raw, _ = server.post("/v1/completions", b'{"prompt": ""}')
    assert got == 400 and json.loads(raw)["error"]["param"] == "prompt"


def test_tpi_chat_against_the_server(server, reference, tiny):
    _, env, _ = tiny
    ref = reference(server.devices, chat=True)
    out = subprocess.run([sys.executable, "-m", "tpicore", "chat", "--url", server.url, "--temperature", "0",
                          "--max-tokens", str(NEW), "--stats"], input=f"{PROMPT}\n/reset\n{PROMPT}\n/exit\n",
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [ref["text"], ref["text"]]
    assert "(new conversation)" in out.stderr and "tok/s" in out.stderr


def test_tpi_chat_local_model(tiny, reference):
    model, env, _ = tiny
    ref = reference(2, chat=True)
    follow = "and then?"
    out = subprocess.run([sys.executable, "-m", "tpicore", "chat", "--model", model, "--devices", "2",
                          "--temperature", "0", "--max-tokens", str(NEW), "--stats"],
                         input=f"{PROMPT}\n{follow}\n/exit\n", capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == ref["text"]
    reused = [line for line in out.stderr.splitlines() if "prompt tokens reused" in line]
    assert len(reused) == 2 and not reused[1].endswith("(0 prompt tokens reused)")
