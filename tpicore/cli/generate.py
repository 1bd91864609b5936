"""`tpi generate`: argument parsing and output for generation, single process or N devices.

Owns the user-facing side of generation (flags, streaming text, --json, --dump-logits) and turning the
flags into one GenerateOptions. Building devices lives in tpicore.runtime.session (one process) and
tpicore.dist.tensor_parallel (N devices); this module must not do math or networking itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from tpicore.cli import checks
from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.dist.session import ParallelSession
from tpicore.errors import TpiError
from tpicore.runtime.generate import Generation, Sampling, generate
from tpicore.runtime.memory import peak_rss_bytes
from tpicore.runtime.session import GenerateOptions, LocalSession
from tpicore.tokenizer import StreamDecoder, Tokenizer
from tpicore.weights.gguf import gguf_tokenizer, is_gguf_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--dump-logits", metavar="FILE.npy", help="save float32 logits [rows, vocab]")
    tp, mem = add_placement_arguments(p)
    mem.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace of the blocks")


def add_placement_arguments(p: argparse.ArgumentParser) -> tuple:
    """The device placement and memory flags every session command shares (generate, serve, chat); returns
    the two argument groups so a command can add its own flags to them."""
    tp = p.add_argument_group("tensor parallelism")
    tp.add_argument("--devices", type=int, default=1, help="number of devices (processes); 1 = single process")
    tp.add_argument("--ratios", help="per-device share, e.g. 3,2,2,1; 'equal'; or 'balanced' (the master gets "
                    "fewer heads/FFN columns for the LM head it also runs); default: equal")
    tp.add_argument("--allreduce", choices=("star", "ring", "tree"), default="star")
    tp.add_argument("--shards", help="use the per-device folders written by `tpi shard` (instead of --model)")
    tp.add_argument("--listen", metavar="HOST:PORT", help="wait for remote workers here instead of spawning them")
    tp.add_argument("--secret-file", help="shared secret for authenticating workers (required off loopback)")
    tp.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="give up on a silent peer after this long")
    tp.add_argument("--private-layers", type=int, default=None, metavar="K",
                    help="run the first K layers on this host alone: workers never see embeddings (default 0, "
                         "or as --shards were written)")
    tp.add_argument("--no-failover", action="store_true",
                    help="a lost device ends the run (default: the survivors, or a spare, take over its share, "
                         "the KV caches are rebuilt and generation goes on)")
    tp.add_argument("--spares", type=int, default=0, metavar="S",
                    help="start S local standby devices that take a lost device's place (remote spares: "
                         "`tpi worker --spare` against --listen)")
    mem = p.add_argument_group("memory scheduler")
    mem.add_argument("--window", type=int, default=None, help="sliding window of resident blocks (>= 2)")
    mem.add_argument("--no-window", action="store_true", help="keep every block resident (default)")
    mem.add_argument("--retain-every", type=int, default=0, help="keep one FFN block in every T resident")
    tp.add_argument("--split-head", action="store_true",
                    help="shard the LM head over the devices by vocabulary rows: each worker then sees its slice's "
                         "logits every step (default: the head stays on the master)")
    mem.add_argument("--dequantize-at-load", action="store_true",
                     help="GGUF/quantized weights widened to float32 when loaded (4-7x the memory, in the window's "
                          "slabs too); default: kept quantized, multiplied by fused dequantize+GEMV kernels")
    return tp, mem


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise TpiError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise TpiError("--prompt-ids: empty")
    return ids


def write_npy_atomic(path: str, arr: np.ndarray) -> None:
    """Write an .npy file under a temporary name and rename it into place (never half-written)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise TpiError(f"--dump-logits: folder {d} does not exist")
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_tokenizer(model_dir: str | None, required: bool) -> Tokenizer | None:
    if model_dir and is_gguf_path(model_dir):  # a GGUF file carries its tokenizer in its metadata
        return gguf_tokenizer(model_dir)
    if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return Tokenizer.from_dir(model_dir)
    if required:
        raise TpiError(f"{model_dir or '--model'}: no tokenizer.json (use --prompt-ids to give token ids)")
    return None


def check_session_flags(args: argparse.Namespace) -> None:
    """The flags every session command shares (generate, chat, serve): one error line for a bad value or a
    flag that would be ignored, before anything is loaded."""
    checks.exclusive("--model", bool(args.model), "--shards", bool(args.shards))
    checks.integer("--devices", args.devices, 1)
    checks.needs("--ratios", args.ratios is not None, "--devices N > 1", args.devices > 1)
    checks.number("--timeout-s", args.timeout_s, lo=0, lo_open=True)
    checks.needs("--retain-every", bool(args.retain_every), "--window", args.window is not None and not args.no_window)
    if args.listen is not None:
        checks.host_port("--listen", args.listen)
    if args.secret_file is not None and args.listen is None:
        raise TpiError("--secret-file: needs --listen (local workers get a random secret)")
    checks.integer("--spares", args.spares, 0, 64)
    checks.needs("--spares", bool(args.spares), "--devices N > 1 without --listen and --no-failover",
                  args.devices > 1 and args.listen is None and not args.no_failover)


def check_generate_flags(args: argparse.Namespace) -> None:
    """`tpi generate`'s own flags: sampling numbers, the prompt's text, and output paths (checked before
    generating, so a bad path never leaves a half-written file or a temporary one)."""
    checks.utf8("--prompt", args.prompt)
    checks.number("--temperature", args.temperature, lo=0)
    checks.number("--top-p", args.top_p, lo=0, lo_open=True, hi=1)
    checks.integer("--top-k", args.top_k, 0)
    checks.integer("--seed", args.seed, 0, 2**63 - 1)
    checks.integer("--max-new-tokens", args.max_new_tokens, 1)
    checks.output_file("--dump-logits", args.dump_logits)
    checks.output_file("--trace", args.trace)
    checks.needs("--split-head", args.split_head, "--devices N > 1", args.devices > 1)


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """The session's options from the flags (--no-window wins over --window)."""
    if not args.model and not args.shards:
        raise TpiError("--model or --shards is required")
    check_session_flags(args)
    return GenerateOptions(model=args.model, shards=args.shards, devices=args.devices, ratios=args.ratios,
                           allreduce=args.allreduce, listen=args.listen, secret_file=args.secret_file,
                           timeout_s=args.timeout_s, window=None if args.no_window else args.window,
                           retain_every=args.retain_every, trace=bool(args.trace),
                           private_layers=args.private_layers, dequantize_at_load=args.dequantize_at_load,
                           split_head=args.split_head, failover=not args.no_failover, spares=args.spares)


def run(args: argparse.Namespace) -> int:
    check_generate_flags(args)
    opts = generate_options(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    Session = LocalSession if opts.local else ParallelSession
    with Session.open(opts) as session:
        cfg = session.cfg
        if session.store.note:
            print(f"note: {session.store.note}", file=sys.stderr)
        tok = load_tokenizer(session.tokenizer_dir, required=args.prompt is not None)
        if args.prompt is not None:
            text = args.prompt
            if args.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=not args.chat)
        else:
            ids = parse_ids(args.prompt_ids)
            bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
            if bad:
                raise TpiError(f"--prompt-ids: {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        if len(ids) + args.max_new_tokens - 1 > cfg.max_position_embeddings:
            raise TpiError(f"context: {len(ids)} prompt tokens + {args.max_new_tokens} new tokens exceed "
                           f"max_position_embeddings = {cfg.max_position_embeddings}")
        session.prepare(max_seq=len(ids) + args.max_new_tokens)

        stream = StreamDecoder(tok) if not args.json and tok is not None else None

        def on_token(t: int) -> None:
            if stream is not None:
                piece = stream.push(t)
                if piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()

        eos = tuple(cfg.eos_token_ids) or ((tok.eos_token_id,) if tok and tok.eos_token_id is not None else ())
        gen: Generation = generate(session.step, ids, args.max_new_tokens, sampling, eos,
                                   max_seq=len(ids) + args.max_new_tokens, keep_logits=bool(args.dump_logits),
                                   on_token=on_token)
        if args.dump_logits:
            write_npy_atomic(args.dump_logits, np.stack(gen.logits).astype(np.float32))
        text = tok.decode(gen.tokens) if tok is not None else ""
        if args.json:
            report = {"tokens": gen.tokens, "text": text, "prompt_tokens": len(ids), "ttft_s": gen.ttft_s,
                      "token_latency_s": gen.token_latency_s, "token_latencies_s": gen.token_latencies_s,
                      "stopped_by": gen.stopped_by, "peak_rss_bytes": peak_rss_bytes()}
            report.update(session.report())
            print(json.dumps(report))
        elif stream is not None:
            sys.stdout.write(stream.flush() + "\n")
        else:
            print(",".join(map(str, gen.tokens)))
        if args.trace:
            session.write_trace(args.trace)
    return 0
