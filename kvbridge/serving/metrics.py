"""The server's Prometheus metrics, all in one place, on a registry of their own.

Request-level values (latencies, tokens) are recorded by the API as requests finish;
engine gauges (KV blocks, queue depth) are refreshed from the engine's stats at each scrape.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. TTFT spans a queue wait plus a prefill; TPOT one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvbridge_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "kvbridge_time_to_first_token_seconds", "Time from arrival to the first output token",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "kvbridge_time_per_output_token_seconds", "Mean time per output token after the first, per request",
            buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "kvbridge_e2e_request_latency_seconds", "Time from arrival to the last output token",
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("kvbridge_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("kvbridge_generation_tokens", "Output tokens generated", registry=r)
        self.kv_blocks_used = Gauge("kvbridge_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_free = Gauge("kvbridge_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_blocks_total = Gauge("kvbridge_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.requests_waiting = Gauge("kvbridge_requests_waiting", "Requests queued in the engine", registry=r)
        self.requests_running = Gauge("kvbridge_requests_running", "Requests being computed by the engine", registry=r)
        self.engine_healthy = Gauge("kvbridge_engine_healthy", "1 while the engine thread is healthy", registry=r)

    def update_engine(self, stats: Any, healthy: bool) -> None:
        """Refresh the gauges from an ``EngineStats`` (num_blocks, num_free_blocks, num_waiting, num_running)."""
        self.kv_blocks_total.set(stats.num_blocks)
        self.kv_blocks_free.set(stats.num_free_blocks)
        self.kv_blocks_used.set(stats.num_blocks - stats.num_free_blocks)
        self.requests_waiting.set(stats.num_waiting)
        self.requests_running.set(stats.num_running)
        self.engine_healthy.set(1 if healthy else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
