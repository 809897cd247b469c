"""Prometheus metrics of one server, in a registry of its own (several apps can share a process,
e.g. in tests, without colliding in prometheus_client's global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Every instrument the server updates; `render()` is the /metrics body."""

    def __init__(self, num_slots: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ktinject_requests",
            "Generation requests by endpoint and outcome: stop, length, cancelled (client gone), "
            "error, rejected (prompt or parameters refused before queueing).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ktinject_prompt_tokens", "Prompt tokens of scheduled requests.", registry=r
        )
        self.generation_tokens = Counter(
            "ktinject_generation_tokens", "Generated tokens.", registry=r
        )
        self.prefix_queries = Counter(
            "ktinject_prefix_cache_queries",
            "Prompt tokens looked up in the prefix (conversation history) cache.",
            registry=r,
        )
        self.prefix_hits = Counter(
            "ktinject_prefix_cache_hits",
            "Prompt tokens reused from the prefix cache instead of prefilled.",
            registry=r,
        )
        self.slots_in_use = Gauge(
            "ktinject_kv_slots_in_use", "KV cache slots held by running requests.", registry=r
        )
        self.slots = Gauge("ktinject_kv_slots", "KV cache slots in all.", registry=r)
        self.slots.set(num_slots)
        self.waiting = Gauge(
            "ktinject_requests_waiting", "Requests queued for a free slot.", registry=r
        )
        self.ttft = Histogram(
            "ktinject_time_to_first_token_seconds",
            "From arrival (queueing included) to the first sampled token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "ktinject_time_per_output_token_seconds",
            "Mean time between output tokens of a request, after the first.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.decode_batch = Histogram(
            "ktinject_decode_batch_size",
            "Requests decoded together per step (continuous batching at work).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
