"""Prometheus metrics with vLLM's names under the prefix ``parallax:``.

Engine-wide numbers (running/waiting requests, KV-cache use, token and prefix-cache
counters) are read from ``LLM.stats()`` at scrape time, so they are exactly the engine's.
Per-request numbers (latency histograms, finished requests by reason) are observed by the
HTTP app as its requests finish. Each app owns its own CollectorRegistry, so a process (a
test) can hold several apps.
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

PREFIX = "parallax:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (stats key, metric name, kind, help)
ENGINE_METRICS = (
    ("num_requests_running", "num_requests_running", "gauge",
     "Requests in the engine's running batch."),
    ("num_requests_waiting", "num_requests_waiting", "gauge",
     "Requests waiting to be scheduled."),
    ("kv_cache_usage", "kv_cache_usage_perc", "gauge",
     "Fraction of KV-cache blocks in use (1 = full)."),
    ("kv_cache_tokens", "kv_cache_capacity_tokens", "gauge",
     "KV-cache capacity in tokens."),
    ("num_preemptions", "num_preemptions", "counter",
     "Requests preempted (to be recomputed) because the KV cache ran out."),
    ("prompt_tokens", "prompt_tokens", "counter", "Prefill tokens processed."),
    ("generation_tokens", "generation_tokens", "counter", "Tokens generated."),
    ("prefix_cache_queries", "prefix_cache_queries", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "counter",
     "Prompt tokens found in the prefix cache."),
)

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Reads ``stats()`` at each scrape; a failing engine yields no engine metrics (and
    /health reports it) rather than failing the whole scrape."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        try:
            s = self.stats()
        except Exception as e:          # a dead engine must not break /metrics
            logger.warning("stats() failed during a metrics scrape: %s", e)
            return
        for key, name, kind, doc in ENGINE_METRICS:
            if key not in s:
                continue
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            fam = cls(PREFIX + name, doc, labels=["model_name"])
            fam.add_metric([self.model_name], float(s[key]))
            yield fam


class ServerMetrics:
    """The metrics of one app; ``observe_*`` are called by the routes."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name))
        lab = ["model_name"]
        r = self.registry
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.failed = Counter(PREFIX + "request_failed",
                              "Requests that did not finish: aborted (client gone) or error.",
                              lab + ["reason"], registry=r)
        self.rejected = Counter(PREFIX + "request_rejected",
                                "Requests refused before reaching the engine, by HTTP status.",
                                lab + ["status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Arrival to first token.", lab, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between tokens of one request (a delta of k tokens counts "
                             "k times its gap / k).", lab, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Arrival to last token.", lab, buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds",
                               "Arrival to the engine scheduling the request.", lab,
                               buckets=REQUEST_BUCKETS, registry=r)
        # Every series present (at 0) from the start, so dashboards and rate() see them.
        for reason in ("stop", "length"):
            self.success.labels(model_name, reason)
        for h in (self.ttft, self.itl, self.e2e, self.queue):
            h.labels(model_name)

    def observe_finished(self, reason: str, arrival: float, first: float | None,
                         finish: float, gaps: list[tuple[float, int]],
                         queue_s: float | None = None) -> None:
        """One finished choice: timestamps from time.monotonic(); gaps: (seconds, tokens)
        between successive deltas after the first."""
        m = self.model_name
        self.success.labels(m, reason).inc()
        if first is not None:
            self.ttft.labels(m).observe(first - arrival)
        itl = self.itl.labels(m)
        for gap, k in gaps:
            for _ in range(k):
                itl.observe(gap / k)
        self.e2e.labels(m).observe(finish - arrival)
        if queue_s is not None:
            self.queue.labels(m).observe(queue_s)

    def observe_failed(self, reason: str) -> None:
        self.failed.labels(self.model_name, reason).inc()

    def observe_rejected(self, status: int) -> None:
        self.rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
