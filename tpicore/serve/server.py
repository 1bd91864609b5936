"""Running `tpi serve`: bind, start the devices once, serve with uvicorn until a signal, stop everything.

Layer: serve. Owns `ServeOptions` (the HTTP side of the flags), the bind rule (127.0.0.1 by default; any
other address needs an API key), the process's signal handling (Ctrl-C and SIGTERM stop uvicorn, cancel
the generation in flight, stop and reap every device process, exit 0), and `Server`, which also runs in
a background thread for tests and benchmarks. Must not parse flags or print anything but the ready line.

    load: SIGINT/SIGTERM -> KeyboardInterrupt -> the half-started group is closed
    serve: uvicorn's handler -> engine.stop() (cancel all) + uvicorn drains -> engine.close() (reap)
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Callable

import uvicorn

from tpicore.comm.endpoint import is_loopback
from tpicore.errors import TpiError
from tpicore.runtime.session import GenerateOptions
from tpicore.serve.app import ServeApp
from tpicore.serve.engine import Engine

SHUTDOWN_GRACE_S = 3  # uvicorn waits this long for open responses after a stop


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready line names it)
    api_key_file: str | None = None
    ctx_tokens: int | None = None  # KV positions (None: min(4096, the model's context))
    queue_limit: int = 8  # requests that may wait while one generates
    model_name: str | None = None  # the id in /v1/models (default: the model folder's name)
    log_level: str = "warning"  # uvicorn's


def read_api_key(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TpiError(f"--api-key-file: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise TpiError(f"--api-key-file: {path} must hold one key of at least 16 characters without spaces")
    return key


def check_bind(host: str, api_key: str | None) -> None:
    """Loopback only, unless clients must authenticate."""
    if not host:
        raise TpiError("--host: empty")
    if not is_loopback(host) and api_key is None:
        raise TpiError(f"--host {host} is not a loopback address: clients off this machine must authenticate; "
                       f"give --api-key-file")


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise TpiError(f"--port: expected 0..65535, got {port}")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise TpiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock


def default_model_name(opts: GenerateOptions) -> str:
    path = opts.model or opts.shards or "model"
    return os.path.basename(os.path.normpath(path)) or "model"


class _Uvicorn(uvicorn.Server):
    """uvicorn that cancels the generation in flight as soon as it is asked to stop."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        self.engine.stop()
        super().handle_exit(sig, frame)


class Server:
    """An engine behind uvicorn on a bound socket."""

    def __init__(self, engine: Engine, opts: ServeOptions, model_name: str, api_key: str | None) -> None:
        self.engine, self.opts = engine, opts
        self.sock = bind(opts.host, opts.port)
        self.port = self.sock.getsockname()[1]
        app = ServeApp(engine, model_name, api_key).build()
        config = uvicorn.Config(app, log_level=opts.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, server_header=False)
        self.uvicorn = _Uvicorn(config, engine)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.opts.host if ":" not in self.opts.host else f"[{self.opts.host}]"
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in this (main) thread until SIGINT/SIGTERM; the engine is closed on the way out."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.sock.close()
            self.engine.close()

    def start(self) -> "Server":
        """Serve from a background thread (no signal handling): tests, benchmarks."""
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                       name="tpi-serve-http", daemon=True)
        self.thread.start()
        while not self.uvicorn.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self.engine.stop()
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(SHUTDOWN_GRACE_S + 5)
        self.sock.close()
        self.engine.close()


def _interrupt_loading(pid: int):
    """SIGTERM while loading stops like Ctrl-C; device processes forked meanwhile inherit this handler and
    die of the signal as they would have without it."""

    def handler(sig: int, frame) -> None:
        if os.getpid() != pid:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        raise KeyboardInterrupt

    return handler


def serve(gen: GenerateOptions, opts: ServeOptions, on_ready: Callable[[str], None]) -> str:
    """`tpi serve`: returns how it stopped ("SIGINT", "SIGTERM") after every device process is gone."""
    api_key = read_api_key(opts.api_key_file)
    check_bind(opts.host, api_key)
    signal.signal(signal.SIGTERM, _interrupt_loading(os.getpid()))  # the half-started group is closed
    engine = Engine.open(gen, opts.ctx_tokens, opts.queue_limit)
    try:
        server = Server(engine, opts, opts.model_name or default_model_name(gen), api_key)
    except BaseException:
        engine.close()
        raise
    stopped: list[str] = []

    def record(sig: int, frame) -> None:  # what uvicorn re-raises after its graceful stop lands here
        stopped.append(signal.Signals(sig).name)
        server.uvicorn.should_exit = True
        engine.stop()

    signal.signal(signal.SIGINT, record)
    signal.signal(signal.SIGTERM, record)
    on_ready(f"tpi serve: {gen.devices} device(s), context {engine.group.ctx_tokens} tokens, "
             f"listening on {server.url}")
    server.run()
    return stopped[0] if stopped else "stop"
