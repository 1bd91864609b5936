"""Prometheus metrics of one server (text exposition at GET /metrics, via prometheus_client).

Layer: serve. Owns the metric names and their registry (one per server, not the library's global one,
so several servers in one process do not collide). Recorded by the engine (tokens, latencies, per-device
seconds) and the app (requests by endpoint and status). Must not compute anything it records.

    tpi_requests_total{endpoint,status}     counter    every answered request (status: HTTP code, or "cancelled")
    tpi_queue_wait_seconds                  histogram  arrival -> generation starts
    tpi_ttft_seconds                        histogram  arrival -> first token
    tpi_token_latency_seconds               histogram  each later token
    tpi_{prompt,cached_prompt,completion}_tokens_total  counters
    tpi_tokens_after_cancel_total           counter    tokens computed after a client left (the step in flight)
    tpi_device_{compute,comm,load,stall}_seconds_total{rank}  counters  per-device time split
    tpi_queue_waiting, tpi_busy, tpi_devices_up            gauges
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tpicore.serve.group import DeviceSplit

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      120.0)


class Metrics:
    def __init__(self, devices: int) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tpi_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.queue_wait = Histogram("tpi_queue_wait_seconds", "From arrival until generation starts",
                                    buckets=_LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("tpi_ttft_seconds", "From arrival to the first generated token",
                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.token_latency = Histogram("tpi_token_latency_seconds", "Time of each token after the first",
                                       buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("tpi_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("tpi_cached_prompt_tokens", "Prompt tokens whose KV caches were reused",
                                     registry=r)
        self.completion_tokens = Counter("tpi_completion_tokens", "Tokens generated", registry=r)
        self.tokens_after_cancel = Counter("tpi_tokens_after_cancel",
                                           "Tokens computed after the client went away (the step in flight)",
                                           registry=r)
        self.device_s = {kind: Counter(f"tpi_device_{kind}_seconds", f"Per-device {kind} time", ["rank"], registry=r)
                         for kind in ("compute", "comm", "load", "stall")}
        self.waiting = Gauge("tpi_queue_waiting", "Requests waiting for the device group", registry=r)
        self.busy = Gauge("tpi_busy", "1 while a generation runs", registry=r)
        self.devices_up = Gauge("tpi_devices_up", "1 while every device asked for serves, 0 after one was lost "
                                "(and not replaced)", registry=r)
        self.devices_serving = Gauge("tpi_devices_serving", "Devices in the group now", registry=r)
        self.recoveries = Counter("tpi_recoveries", "Regroups after a lost device (or to admit standby ones)",
                                  registry=r)
        self.devices_lost = Counter("tpi_devices_lost", "Devices declared lost", registry=r)
        self.recovery_s = Histogram("tpi_recovery_seconds", "From the failed step to the group serving again",
                                    buckets=_LATENCY_BUCKETS_S, registry=r)
        for kind in self.device_s.values():  # every rank shows from the start, at 0
            for rank in range(devices):
                kind.labels(rank=str(rank))
        self.devices_up.set(1)
        self.devices_serving.set(devices)

    def request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def devices(self, splits: list[DeviceSplit]) -> None:
        for s in splits:
            rank = str(s.rank)
            for kind, seconds in (("compute", s.compute_s), ("comm", s.comm_s), ("load", s.load_s),
                                  ("stall", s.stall_s)):
                self.device_s[kind].labels(rank=rank).inc(max(0.0, seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)
