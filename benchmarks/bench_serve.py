"""Serving vs one-shot generation, side by side in one run: TTFT, conversation reuse, HTTP/SSE overhead.

Same model, prompt and placement (default: synthetic small-100m f32 on 2 local devices):
  1. TTFT: `tpi generate --chat --json` (a fresh process each time: start, load, answer) vs a request to
     a warm `tpi serve` (client clock: request sent -> first token chunk in; cache_prompt off, so the
     whole prompt is prefilled as generate does). Target: served <= 1.1 x generate.
  2. A follow-up turn (the first turn, its reply, a new user message) with conversation reuse vs the
     same turn prefilled from scratch: reuse pays for the new tokens only (both numbers shown).
  3. HTTP/SSE overhead per token: the gap between two token chunks at the client minus the engine's time
     for that token (timings.token_latencies_ms of the same reply), paired per token. Target: < 1 ms.
     Also the server's own share: per token, engine sampled it -> its chunk written (timings.delivery_ms).

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--devices 2] [--runs 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, ensure_model, print_table  # noqa: E402

WORDS = ("the edge devices share one model split by heads so each holds a slice of every layer and "
         "the master keeps the tokens while workers only see hidden states ").split()


def prompt_text(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "TOKENIZERS_PARALLELISM": "false"}


def generate_ttft(model: str, devices: int, prompt: str, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "tpicore", "generate", "--model", model, "--devices", str(devices), "--chat",
           "--prompt", prompt, "--max-new-tokens", str(tokens), "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env())
    wall_s = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"tpi generate failed: {out.stderr}")
    rep = json.loads(out.stdout)
    return {"ttft_s": rep["ttft_s"], "token_s": rep["token_latency_s"], "prompt_tokens": rep["prompt_tokens"],
            "wall_s": wall_s, "text": rep["text"]}


class Served:
    """A `tpi serve` subprocess and a minimal streaming client (http.client: little client-side work)."""

    def __init__(self, model: str, devices: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tpicore", "serve", "--model", model, "--devices",
                                      str(devices), "--port", "0", "--queue", "1"],
                                     stdout=subprocess.PIPE, text=True, env=env())
        deadline = time.monotonic() + 600
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                line = self.proc.stdout.readline()
                if "listening on " in line:
                    self.port = int(line.rsplit(":", 1)[1])
                elif not line:
                    raise SystemExit("tpi serve exited before it was ready")
        if not self.port:
            raise SystemExit("tpi serve did not start")

    def chat(self, messages: list[dict], tokens: int, reuse: bool) -> dict:
        """One streamed greedy chat request: client-side TTFT and chunk arrival times, the server's timings."""
        body = json.dumps({"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
                           "cache_prompt": reuse})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        arrivals, text, last = [], [], {}
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if msg["choices"] and msg["choices"][0]["finish_reason"] is None:
                arrivals.append(time.perf_counter())
                text.append(msg["choices"][0]["delta"].get("content", ""))
            if "usage" in msg:
                last = msg
        conn.close()
        return {"ttft_s": arrivals[0] - t0, "arrivals": arrivals, "text": "".join(text),
                "timings": last["timings"], "usage": last["usage"]}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


ASSISTANT = ("Tensor parallelism splits every layer by attention heads and by columns of the feed-forward "
             "weights, so each device holds a slice of the whole model and they add their partial results after "
             "the attention and after the feed-forward block of every layer.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint with a tokenizer (default: synthetic small-100m f32)")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=120, help="words in the first user message")
    ap.add_argument("--follow-words", default="8,64", help="words in the follow-up user message (a list)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per reply")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    model = args.model or ensure_model("small-100m")
    first = prompt_text(args.prompt_words)
    print(f"# model {model}, {args.devices} devices, {args.runs} runs each; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    med = statistics.median
    srv = Served(model, args.devices)
    try:
        msgs = [{"role": "user", "content": first}]
        srv.chat(msgs, 4, reuse=False)  # the first request after start: nothing special, but keep it apart
        gens, served = [], []
        for _ in range(args.runs):  # interleaved: both see the same machine load
            gens.append(generate_ttft(model, args.devices, first, args.tokens))
            served.append(srv.chat(msgs, args.tokens, reuse=False))
        assert served[0]["text"] == gens[0]["text"], "served greedy text differs from tpi generate"
        # follow-ups that extend the conversation held in the caches (the assistant turn is a natural-language
        # text: a random synthetic model's own reply is made of placeholder tokens that do not re-tokenize the
        # same, so only a real model's reply would be reused as well)
        base = [{"role": "user", "content": first}, {"role": "assistant", "content": ASSISTANT},
                {"role": "user", "content": prompt_text(16)}]
        follow_rows = []
        for words in (int(w) for w in args.follow_words.split(",")):
            follow = base + [{"role": "assistant", "content": ASSISTANT},
                             {"role": "user", "content": prompt_text(words)}]
            reuse, scratch = [], []
            for _ in range(args.runs):
                srv.chat(base, 4, reuse=False)  # the previous turn: the caches hold it
                reuse.append(srv.chat(follow, 4, reuse=True))
                scratch.append(srv.chat(follow, 4, reuse=False))
            u = reuse[0]["usage"]
            new = u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]
            r_ttft, f_ttft = med(r["ttft_s"] for r in reuse), med(r["ttft_s"] for r in scratch)
            follow_rows += [
                {"what": f"+{words} words, conversation reuse", "prompt": u["prompt_tokens"], "new": new,
                 "ttft": r_ttft * 1e3, "per_new": r_ttft * 1e3 / new},
                {"what": f"+{words} words, prefilled from scratch", "prompt": u["prompt_tokens"],
                 "new": u["prompt_tokens"], "ttft": f_ttft * 1e3, "per_new": f_ttft * 1e3 / u["prompt_tokens"]}]
        decode = [srv.chat(msgs, args.tokens, reuse=True) for _ in range(args.runs)]
    finally:
        code = srv.stop()

    g_ttft, s_ttft = med(r["ttft_s"] for r in gens), med(r["ttft_s"] for r in served)
    s_prefill = med(r["timings"]["prefill_ms"] / 1e3 for r in served)
    print_table([
        {"what": "tpi generate (fresh process)", "prompt": gens[0]["prompt_tokens"], "ttft": g_ttft * 1e3,
         "runs": " ".join(f"{r['ttft_s'] * 1e3:.0f}" for r in gens), "ratio": 1.0,
         "note": f"whole command {med(r['wall_s'] for r in gens):.2f} s"},
        {"what": "tpi serve (warm), client clock", "prompt": served[0]["usage"]["prompt_tokens"], "ttft": s_ttft * 1e3,
         "runs": " ".join(f"{r['ttft_s'] * 1e3:.0f}" for r in served), "ratio": s_ttft / g_ttft,
         "note": f"engine prefill {s_prefill * 1e3:.1f} ms; HTTP, template, queue "
                 f"{med(r['ttft_s'] - r['timings']['prefill_ms'] / 1e3 for r in served) * 1e3:.2f} ms"},
    ], [("what", "same prompt and placement"), ("prompt", "prompt tok"), ("ttft", "TTFT ms (median)"),
        ("runs", "each run"), ("ratio", "vs generate"), ("note", "")],
        "1. Time to first token (target: served <= 1.1 x generate)")
    print_table(follow_rows, [("what", "follow-up turn"), ("prompt", "prompt tok"), ("new", "prefilled tok"),
                              ("ttft", "TTFT ms"), ("per_new", "ms / prefilled tok")],
                "2. Follow-up turn: with reuse only the new tokens are prefilled")
    rows = []
    for r in decode:
        gaps = [b - a for a, b in zip(r["arrivals"], r["arrivals"][1:])]  # client: token i-1 -> token i
        engine = [ms / 1e3 for ms in r["timings"]["token_latencies_ms"]]  # engine: the step of token i
        over = [g - e for g, e in zip(gaps, engine)]
        deliver = r["timings"]["delivery_ms"]  # server: token sampled -> its chunk written to the socket
        rows.append({"tokens": len(r["arrivals"]), "client": med(gaps) * 1e3, "engine": med(engine) * 1e3,
                     "over_med": med(over) * 1e3, "over_mean": statistics.fmean(over) * 1e3,
                     "deliver": f"{med(deliver):.3f} / {statistics.fmean(deliver):.3f} / {max(deliver):.2f}"})
    print_table(rows, [("tokens", "tokens"), ("client", "client gap ms (median)"), ("engine", "engine ms (median)"),
                       ("over_med", "overhead ms (median)"), ("over_mean", "overhead ms (mean)"),
                       ("deliver", "server delivery ms (median / mean / max)")],
                "3. HTTP/SSE overhead per token = client gap - engine time, paired per token (target < 1 ms);\n"
                "   server delivery = engine sampled the token -> its SSE chunk written")
    print(f"\n# tpi serve exit code after SIGTERM: {code}; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
