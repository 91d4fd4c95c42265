"""Prometheus metrics, in the vLLM style under our own prefix, one registry per app.

Labels are bounded: ``tenant`` (configured tenants only), ``outcome`` and ``tier``; never the task name.
Request timings are observed through :class:`RequestObserver`, called by the engine client on the event loop
as each engine step's outputs arrive (with the engine process's timestamps).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefixes.store import PrefixStore
from server.frontend.request_state import RequestObserver, RequestState

NAMESPACE = "prefix_serve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class _StoreCollector:
    """Reads the store's per-tier counters at scrape time instead of instrumenting its hot path."""

    def __init__(self, store: PrefixStore):
        self.store = store

    def collect(self):
        tiers = self.store.tier_stats()
        series = (
            (CounterMetricFamily, "prefix_cache_hits", "hits", "Prefix lookups answered by this tier."),
            (CounterMetricFamily, "prefix_cache_misses", "misses",
             "Prefix lookups this tier could not answer."),
            (CounterMetricFamily, "prefix_cache_evictions", "evictions",
             "Prefixes evicted from this tier by its byte budget."),
            (CounterMetricFamily, "prefix_cache_load_seconds", "load_seconds_total",
             "Time spent loading prefixes from this tier."),
            (GaugeMetricFamily, "prefix_cache_resident_bytes", "resident_bytes",
             "Bytes of prefixes held by this tier."),
            (GaugeMetricFamily, "prefix_cache_resident_tasks", "resident_tasks", "Tasks held by this tier."),
        )
        for kind, name, field, help_ in series:
            family = kind(f"{NAMESPACE}_{name}", help_, labels=["tier"])
            for tier, stats in tiers.items():
                family.add_metric([tier], getattr(stats, field))
            yield family

class Metrics(RequestObserver):
    def __init__(self, store: PrefixStore, num_running: Callable[[], int], num_waiting: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(f"{NAMESPACE}_requests", "Requests by tenant and outcome (stop, length, "
                                "cancelled, error, timeout, rejected, rate_limited, overloaded).",
                                ["tenant", "outcome"], registry=r)
        self.prompt_tokens = Counter(f"{NAMESPACE}_prompt_tokens", "Prompt tokens computed, as the engine "
                                     "computes them (prefix-cache hits are in kv_prefix_cache_hits).",
                                     ["tenant"], registry=r)
        self.generation_tokens = Counter(f"{NAMESPACE}_generation_tokens", "Tokens generated.", ["tenant"],
                                         registry=r)
        self.ttft = Histogram(f"{NAMESPACE}_time_to_first_token_seconds", "Arrival to first token.",
                              ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{NAMESPACE}_inter_token_latency_seconds", "Time between consecutive tokens.",
                             ["tenant"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{NAMESPACE}_e2e_request_latency_seconds", "Arrival to last token.", ["tenant"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{NAMESPACE}_request_queue_time_seconds",
                                    "Arrival to joining the batch.", ["tenant"], buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.batch_size = Histogram(f"{NAMESPACE}_batch_size", "Rows in each decode step.",
                                    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128), registry=r)
        Gauge(f"{NAMESPACE}_num_requests_running", "Requests in the running batch.",
              registry=r).set_function(num_running)
        Gauge(f"{NAMESPACE}_num_requests_waiting", "Requests waiting to join the batch.",
              registry=r).set_function(num_waiting)
        r.register(_StoreCollector(store))
        self.engine_restarts = Counter(f"{NAMESPACE}_engine_restarts", "Engine processes started to replace "
                                       "one that exited or stalled (cause: exited, stalled, start_failed).",
                                       ["cause"], registry=r)
        # The paged key/value cache, with vLLM's meanings (kv_cache_usage_perc, prefix_cache_queries/hits in
        # tokens, num_preemptions); "kv_prefix_cache" keeps them apart from the task store's prefix_cache_*.
        self.kv_usage = Gauge(f"{NAMESPACE}_kv_cache_usage_perc", "Fraction of key/value blocks in use "
                              "(running requests and resident task prefixes; 1 = full).", registry=r)
        self.kv_queries = Counter(f"{NAMESPACE}_kv_prefix_cache_queries", "Prompt tokens looked up in the "
                                  "prefix cache (requests that may use it).", registry=r)
        self.kv_hits = Counter(f"{NAMESPACE}_kv_prefix_cache_hits", "Prompt tokens served from the prefix "
                               "cache instead of computed.", registry=r)
        self.preemptions = Counter(f"{NAMESPACE}_num_preemptions", "Running requests preempted for lack of "
                                   "key/value blocks (recomputed when they rejoin).", registry=r)

    # -- RequestObserver ------------------------------------------------------------------------------------

    def admitted(self, seqs: list[RequestState], now: float) -> None:
        for seq in seqs:
            self.queue_time.labels(seq.tenant).observe(now - seq.arrival_time)

    def decoded(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    def prefilled(self, seq: RequestState, tokens: int) -> None:
        self.prompt_tokens.labels(seq.tenant).inc(tokens)

    def cache_stats(self, usage: float, queries: int, hits: int, preemptions: int) -> None:
        self.kv_usage.set(usage)
        self.kv_queries.inc(queries)
        self.kv_hits.inc(hits)
        self.preemptions.inc(preemptions)

    def token(self, seq: RequestState, now: float) -> None:
        self.generation_tokens.labels(seq.tenant).inc()  # as each token arrives, not when the request ends
        if seq.last_token_time is None:
            self.ttft.labels(seq.tenant).observe(now - seq.arrival_time)
        else:
            self.itl.labels(seq.tenant).observe(now - seq.last_token_time)

    def finished(self, seq: RequestState, now: float) -> None:
        assert seq.finish_reason is not None, "called once it has finished"
        self.requests.labels(seq.tenant, seq.finish_reason.value).inc()
        self.e2e.labels(seq.tenant).observe(now - seq.arrival_time)

    def engine_restarted(self, cause: str) -> None:
        self.engine_restarts.labels(cause).inc()

    def rejected(self, tenant: str, outcome: str) -> None:
        """A request refused before reaching the engine (``rejected``: bad request, ``rate_limited``: 429,
        ``overloaded``: 503, the waiting queue is full or the engine cannot serve)."""
        self.requests.labels(tenant, outcome).inc()
