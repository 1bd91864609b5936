"""`tpi chat`: an interactive multi-turn chat in the terminal, streamed, against a model or a server.

Owns the read-eval-print loop and its commands (/reset starts a new conversation, /exit or end of input
leaves; Ctrl-C during a reply stops that reply), and choosing the backend: `--url` for a running
`tpi serve`, else the model and placement flags of `tpi generate` for an engine in this process
(tpicore.serve.chat). Must not do any generation or HTTP itself.
"""

from __future__ import annotations

import argparse
import sys

from tpicore.cli.serve import add_model_arguments, session_options
from tpicore.errors import TpiError
from tpicore.serve.chat import ChatBackend, ChatParams, LocalChat, RemoteChat
from tpicore.serve.server import read_api_key

HELP = "commands: /reset (new conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running `tpi serve`, e.g. http://127.0.0.1:8000 (instead of --model)")
    p.add_argument("--api-key-file", help="API key for --url (sent as `Authorization: Bearer`)")
    p.add_argument("--system", help="a system message opening every conversation")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per reply (default: what the context leaves)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stats", action="store_true", help="print tokens, TTFT and tokens/s after each reply")
    add_model_arguments(p)


def open_backend(args: argparse.Namespace) -> ChatBackend:
    if args.url:
        if args.model or args.shards:
            raise TpiError("--url talks to a running server; leave out --model/--shards")
        return RemoteChat(args.url, read_api_key(args.api_key_file))
    return LocalChat.open(session_options(args), args.ctx_size)


def run(args: argparse.Namespace) -> int:
    params = ChatParams(args.max_tokens, args.temperature, args.top_p, args.seed)
    backend = open_backend(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    print(HELP, file=sys.stderr)
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                messages = list(opening)
                print("(new conversation)", file=sys.stderr)
                continue
            if text.startswith("/"):
                print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": text})
            reply = []
            try:
                for piece in backend.stream(messages, params):
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                print("\n(stopped)", file=sys.stderr)
            except TpiError as e:
                messages.pop()
                print(f"\nerror: {e}", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})
            if args.stats and backend.last is not None:
                r = backend.last
                print(f"({r.completion_tokens} tokens, TTFT {r.ttft_ms:.1f} ms, {r.tokens_per_s:.1f} tok/s, "
                      f"{r.cached_tokens} prompt tokens reused)", file=sys.stderr)
    finally:
        backend.close()
    return 0
