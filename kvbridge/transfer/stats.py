"""Bytes moved and transfer times, kept as plain numbers and exported to Prometheus at scrape.

``record`` runs on a transfer's critical path, right after a copy that has evicted the
caches: there, prometheus-client's ``Counter.inc`` and ``Histogram.observe`` (a lock per
value, a walk over the buckets) cost ~45 µs per transfer, against ~10 µs for a few
additions and a ``bisect`` on plain numbers. A collector turns the numbers into the same
families at scrape time: ``kvbridge_kv_transfer_bytes_total`` and the histogram
``kvbridge_kv_transfer_seconds``, labelled by backend and role.

``add`` runs on the engine thread and ``collect`` on the scraping one; a scrape that lands
between two additions of one transfer may show its bytes without its time (one scrape,
one transfer), never a torn number.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

from prometheus_client.core import REGISTRY, CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

SECONDS_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 60.0)


class _Cell:
    __slots__ = ("num_bytes", "seconds_sum", "buckets")

    def __init__(self, n: int) -> None:
        self.num_bytes = 0
        self.seconds_sum = 0.0
        self.buckets = [0] * n  # per bucket, not cumulative; the last is +Inf


class TransferStats(Collector):
    def __init__(self, buckets: Sequence[float] = SECONDS_BUCKETS) -> None:
        self._bounds = [*buckets, float("inf")]
        self._cells: dict[tuple[str, str], _Cell] = {}

    def add(self, backend: str, role: str, num_bytes: int, seconds: float) -> None:
        cell = self._cells.get((backend, role))
        if cell is None:
            cell = self._cells[(backend, role)] = _Cell(len(self._bounds))
        cell.num_bytes += num_bytes
        cell.seconds_sum += seconds
        cell.buckets[bisect.bisect_left(self._bounds, seconds)] += 1  # Prometheus buckets are "≤ bound"

    def collect(self) -> Iterator[Metric]:
        moved = CounterMetricFamily("kvbridge_kv_transfer_bytes", "KV bytes moved by the transceiver", labels=["backend", "role"])
        times = HistogramMetricFamily(
            "kvbridge_kv_transfer_seconds",
            "KV transfer time, from the start of the transfer to its completion",
            labels=["backend", "role"],
        )
        for (backend, role), cell in list(self._cells.items()):
            moved.add_metric([backend, role], cell.num_bytes)
            cumulative = itertools.accumulate(list(cell.buckets))
            buckets = [(floatToGoString(b), c) for b, c in zip(self._bounds, cumulative, strict=True)]
            times.add_metric([backend, role], buckets, cell.seconds_sum)
        yield moved
        yield times


STATS = TransferStats()
REGISTRY.register(STATS)
