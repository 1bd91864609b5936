"""`tpi serve`: flags and the ready line for serving a model over an OpenAI-compatible HTTP API.

Owns the user-facing side of serving: the model and placement flags (the same as `tpi generate`'s, turned
into GenerateOptions by tpicore.cli.generate's own generate_options, see session_options) and the HTTP
flags (ServeOptions). The server itself is tpicore.serve; this module must not serve, do math or networking.
"""

from __future__ import annotations

import argparse
import sys

from tpicore.cli import generate
from tpicore.runtime.session import GenerateOptions
from tpicore.serve.server import ServeOptions, serve


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and device placement flags of `tpi generate` (also used by `tpi chat`), with the same dests
    (see session_options)."""
    p.add_argument("--model", help="HF checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--ctx-size", type=int, default=None, metavar="N",
                   help="KV cache positions per conversation (default min(4096, the model's context))")
    generate.add_placement_arguments(p)


def session_options(args: argparse.Namespace) -> GenerateOptions:
    """GenerateOptions as `tpi generate` builds them: every generate flag at its default, overridden by the
    ones given here (a flag added to generate later keeps its default here rather than breaking serve)."""
    defaults = argparse.ArgumentParser(add_help=False)
    generate.add_arguments(defaults)
    ns = defaults.parse_args(["--prompt-ids", "1"])
    known = vars(ns)
    known.update({k: v for k, v in vars(args).items() if k in known})
    return generate.generate_options(ns)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                                                          "needs --api-key-file)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    http.add_argument("--api-key-file", help="file holding the API key clients send as `Authorization: Bearer`")
    http.add_argument("--queue", type=int, default=8, metavar="N",
                      help="requests that may wait while one generates (default 8; more get 429)")
    http.add_argument("--alias", help="model id in /v1/models (default: the model folder's name)")
    http.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                      help="uvicorn's log level (default warning)")


def run(args: argparse.Namespace) -> int:
    gen = session_options(args)
    opts = ServeOptions(host=args.host, port=args.port, api_key_file=args.api_key_file, ctx_tokens=args.ctx_size,
                        queue_limit=args.queue, model_name=args.alias, log_level=args.log_level)

    def ready(line: str) -> None:
        print(line, flush=True)

    how = serve(gen, opts, ready)
    print(f"tpi serve: stopped ({how}); every device process has exited", file=sys.stderr, flush=True)
    return 0
