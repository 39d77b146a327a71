"""Prometheus text exposition of the server's counters (no client library needed): KV hits per tier, bytes per
tier, a time-to-first-token histogram, queue length."""

from __future__ import annotations

import bisect
import heapq
import threading
from collections import Counter
from typing import Iterable

#: engine iterations whose phase breakdown :meth:`Metrics.slowest` keeps
SLOWEST_KEPT = 32
#: TTFT histogram upper bounds in seconds
TTFT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket histogram as Prometheus defines it."""

    def __init__(self, buckets: Iterable[float] = TTFT_BUCKETS):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last one: +Inf
        self.sum = 0.0
        self.n = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value
            self.n += 1

    def lines(self, name: str) -> list[str]:
        with self._lock:
            out, cum = [], 0
            for bound, c in zip(self.bounds + (float("inf"),), self.counts):
                cum += c
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'{name}_bucket{{le="{le}"}} {cum}')
            out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
            return out


class Metrics:
    """Counters the engine updates; :meth:`render` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.ttft = Histogram()
        #: host seconds of the engine loop per phase (prefill, sample, advance, step), summed over iterations
        self.phases: Counter[str] = Counter()
        self._slowest: list[tuple[float, int, dict[str, float]]] = []  # a min-heap of the slowest iterations
        self._iterations = 0
        self._lock = threading.Lock()

    def inc(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.counters[name] += by

    def iteration(self, phases: dict[str, float], keep: int = SLOWEST_KEPT) -> None:
        """Record one engine iteration's host seconds per phase (what a long gap between two tokens was spent on:
        :meth:`slowest` keeps the ``keep`` slowest iterations' breakdowns)."""
        total = sum(phases.values())
        with self._lock:
            self.phases.update(phases)
            self._iterations += 1
            item = (total, self._iterations, dict(phases))
            if len(self._slowest) < keep:
                heapq.heappush(self._slowest, item)
            elif total > self._slowest[0][0]:
                heapq.heapreplace(self._slowest, item)

    def slowest(self) -> list[dict[str, float]]:
        """The slowest iterations recorded, slowest first: ``{"total", "iteration", <phase>: seconds}``."""
        with self._lock:
            items = sorted(self._slowest, reverse=True)
        return [{"total": t, "iteration": i, **p} for t, i, p in items]

    def render(self, store_usage: dict[str, dict[str, int]], store_stats: dict[str, int], queue: int,
               active: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        tiers = list(store_usage)
        metric("squeezekv_kv_hits_total", "counter", "prompt prefixes served from the KV store, by tier",
               [(f'{{tier="{t}"}}', store_stats.get(f"hit_{t}", 0)) for t in tiers])
        metric("squeezekv_kv_misses_total", "counter", "prompts with no reusable KV in the store",
               [("", store_stats.get("miss", 0) + store_stats.get("miss_evicted", 0))])
        metric("squeezekv_kv_corrupt_total", "counter", "stored entries that failed their checks (recomputed)",
               [(f'{{tier="{t}"}}', store_stats.get(f"corrupt_{t}", 0)) for t in tiers])
        metric("squeezekv_kv_tier_errors_total", "counter",
               "reads or writes a tier failed (an unwritable disk folder, say): served as misses",
               [(f'{{tier="{t}"}}', store_stats.get(f"error_{t}", 0)) for t in tiers])
        metric("squeezekv_kv_evictions_total", "counter", "entries dropped from the last tier they were in",
               [(f'{{tier="{t}"}}', store_stats.get(f"evicted_{t}", 0)) for t in tiers])
        metric("squeezekv_kv_bytes", "gauge", "bytes of KV held, by tier",
               [(f'{{tier="{t}"}}', u["used"]) for t, u in store_usage.items()])
        metric("squeezekv_kv_capacity_bytes", "gauge", "capacity of each tier",
               [(f'{{tier="{t}"}}', u["capacity"]) for t, u in store_usage.items()])
        metric("squeezekv_kv_entries", "gauge", "entries held, by tier",
               [(f'{{tier="{t}"}}', u["entries"]) for t, u in store_usage.items()])
        metric("squeezekv_queue_length", "gauge", "requests waiting to be admitted", [("", queue)])
        metric("squeezekv_active_requests", "gauge", "requests being prefilled or decoded", [("", active)])
        with self._lock:
            counters = dict(self.counters)
        for name, help_ in (("requests_total", "requests finished"), ("prompt_tokens_total", "prompt tokens"),
                            ("cached_prompt_tokens_total", "prompt tokens whose KV came from the store"),
                            ("generated_tokens_total", "tokens generated"),
                            ("request_errors_total", "requests rejected or failed"),
                            ("cancelled_requests_total", "requests stopped because their client went away"),
                            ("store_errors_total", "KV store calls that failed (served as misses)")):
            metric(f"squeezekv_{name}", "counter", help_, [("", counters.get(name, 0))])
        with self._lock:
            phases = dict(self.phases)
        metric("squeezekv_engine_seconds_total", "counter",
               "host seconds of the engine loop by phase (prefill, sample: with the wait for the device, advance: "
               "streaming and finishing requests, step: launching the batched decode step)",
               [(f'{{phase="{k}"}}', v) for k, v in sorted(phases.items())])
        lines.append("# HELP squeezekv_ttft_seconds time from admission to queue to the first token")
        lines.append("# TYPE squeezekv_ttft_seconds histogram")
        lines.extend(self.ttft.lines("squeezekv_ttft_seconds"))
        return "\n".join(lines) + "\n"


__all__ = ["Histogram", "Metrics", "SLOWEST_KEPT", "TTFT_BUCKETS"]
