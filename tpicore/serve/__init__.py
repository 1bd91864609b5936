"""Layer 6, serve: a loaded device group kept up behind an OpenAI-compatible HTTP API.

group.py (the session of tpicore.runtime / tpicore.dist seen as one device group: open, per-rank time
splits, lost ranks, local pids, close), turn.py (one generation on a warm KV cache: prefix reuse, sampling,
stop strings), engine.py (one generation at a time, a bounded FIFO queue, cancellation, health),
protocol.py (OpenAI request records and response bodies), metrics.py (Prometheus exposition), app.py
(Starlette routes, auth, server-sent events), server.py (uvicorn, signals, clean shutdown), client.py
(a streaming client of a running server, for `tpi chat`), static/index.html (the chat page at `/`).
Imports every lower layer (model, weights, runtime, comm, tools, dist); must not import cli.
"""
