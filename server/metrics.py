"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefixes.store import PrefixStore

NAMESPACE = "prefix_serve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _StoreCollector:
    """Reads the store's counters at scrape time instead of instrumenting its hot path."""

    def __init__(self, store: PrefixStore):
        self.store = store

    def collect(self):
        s = self.store.stats
        for name, value, help_ in (
            ("prefix_cache_hits", s.hits, "Prefix lookups served from memory."),
            ("prefix_cache_misses", s.misses, "Prefix lookups that loaded from disk."),
            ("prefix_cache_evictions", s.evictions, "Prefixes evicted from memory by the byte budget."),
            ("prefix_cache_load_seconds", s.load_seconds_total, "Time spent loading prefixes from disk."),
        ):
            family = CounterMetricFamily(f"{NAMESPACE}_{name}", help_, labels=["tier"])
            family.add_metric(["memory"], value)
            yield family
        for name, value, help_ in (
            ("prefix_cache_resident_bytes", s.resident_bytes, "Bytes of prefixes resident in memory."),
            ("prefix_cache_resident_tasks", s.resident_tasks, "Tasks resident in memory."),
        ):
            family = GaugeMetricFamily(f"{NAMESPACE}_{name}", help_, labels=["tier"])
            family.add_metric(["memory"], value)
            yield family


class Metrics:
    def __init__(self, store: PrefixStore, num_running, num_waiting):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{NAMESPACE}_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.prompt_tokens = Counter(f"{NAMESPACE}_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(f"{NAMESPACE}_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(f"{NAMESPACE}_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{NAMESPACE}_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{NAMESPACE}_batch_size", "Rows in each decode step.",
                                    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128), registry=r)
        Gauge(f"{NAMESPACE}_num_requests_running", "Requests in the running batch.",
              registry=r).set_function(num_running)
        Gauge(f"{NAMESPACE}_num_requests_waiting", "Requests waiting to join the batch.",
              registry=r).set_function(num_waiting)
        r.register(_StoreCollector(store))
