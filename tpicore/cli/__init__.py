"""The `tpi` command line: a thin dispatcher over subcommands.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only wires them up, turns `TpiError` (and argparse's own refusals, `Parser`) into one
`error: ...` line with exit code 2, and must not do any work at import. Value checks shared by the
subcommands live in tpicore.cli.checks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from tpicore.errors import TpiError

# subcommand -> (module, help). Modules are imported only when their subcommand is used.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("tpicore.cli.generate", "generate text from a checkpoint (single process or N devices)"),
    "synth": ("tpicore.cli.synth", "write a synthetic HF-layout checkpoint (random weights, real BPE tokenizer)"),
    "shard": ("tpicore.cli.shard", "split a checkpoint into one folder per device"),
    "worker": ("tpicore.cli.worker", "run one worker device that joins a master over TCP"),
    "plan": ("tpicore.cli.plan", "predict per-device memory and whether disk I/O can hide"),
    "serve": ("tpicore.cli.serve", "serve a model over an OpenAI-compatible HTTP API, with a chat page"),
    "chat": ("tpicore.cli.chat", "chat in the terminal with a model or a running `tpi serve`"),
}


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one `error: ...` line and exit 2, like every other bad input (no usage
    block; --help shows it). Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(prog="tpi", description="Tensor-parallel Llama inference in NumPy")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only import the module whose arguments we need
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except TpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
