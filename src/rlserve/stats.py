"""Server statistics: plain counters and bounded windows, cheap on the hot path.

The server thread only appends to deques and bumps integers; percentiles are
computed when someone calls :meth:`ServerStats.snapshot`. The snapshot holds
rlserve's keys and torchrl's (``avg_batch_size``, ``p50_queue_ms``, ...).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Sequence

__all__ = ["ServerStats", "NoStats", "format_stats"]

_RATE_WINDOW_S = 5.0  # requests/s is measured over this many recent seconds


def _pct(sorted_vals: list, q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, int(round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def _ms(v):
    return None if v is None else v * 1e3


class ServerStats:
    """Counters owned by one server; written by its loop, read by anyone.

    Args:
        max_batch_size: size of the batch-size histogram.
        window: samples kept per latency window (and batch sizes for ``avg_batch_size``).
    """

    def __init__(self, max_batch_size: int, window: int = 1024):
        self.max_batch_size = max_batch_size
        self.window = max(1, int(window))
        self.reset()

    def reset(self) -> None:
        """Clear every counter and window (the policy version lives elsewhere)."""
        w = self.window
        self.requests = 0
        self.batches = 0
        self.errors = 0
        self.rejected = 0  # requests that failed validation before any forward
        self.weight_updates = 0
        self.hist = [0] * (self.max_batch_size + 1)
        self.sizes = deque(maxlen=w)
        self.queue_wait = deque(maxlen=w)
        self.latency = deque(maxlen=w)
        self.forward = deque(maxlen=w)
        self.recent = deque(maxlen=4096)  # (time, n) per batch, for requests/s
        self.started = time.perf_counter()

    def record_batch(self, n: int, t_forward: float, t_done: float, submit_times: Sequence[float]) -> None:
        self.requests += n
        self.batches += 1
        self.hist[n if n < len(self.hist) else -1] += 1
        self.sizes.append(n)
        self.forward.append(t_forward)
        self.recent.append((t_done, n))
        self.latency.extend([t_done - t for t in submit_times])

    def record_waits(self, t_drain: float, submit_times: Sequence[float]) -> None:
        self.queue_wait.extend([t_drain - t for t in submit_times])

    def snapshot(self, policy_version: int) -> dict:
        now = time.perf_counter()
        qw = sorted(self.queue_wait)
        lat = sorted(self.latency)
        fw = sorted(self.forward)
        horizon = now - _RATE_WINDOW_S
        recent = [(t, n) for t, n in list(self.recent) if t >= horizon]
        if recent:
            span = max(now - max(horizon, self.started), 1e-9)
            rate = sum(n for _, n in recent) / span
        else:
            rate = 0.0
        elapsed = max(now - self.started, 1e-9)
        sizes = list(self.sizes)
        return {
            "requests": self.requests,
            "batches": self.batches,
            "mean_batch_size": self.requests / self.batches if self.batches else 0.0,
            "batch_size_hist": {i: c for i, c in enumerate(self.hist) if c},
            "queue_wait_ms": {q: _ms(_pct(qw, p)) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
            "forward_ms": {q: _ms(_pct(fw, p)) for q, p in (("p50", 0.5), ("p95", 0.95))},
            "latency_ms": {q: _ms(_pct(lat, p)) for q, p in (("p50", 0.5), ("p99", 0.99))},
            "requests_per_s": rate,
            "policy_version": policy_version,
            "errors": self.errors,
            "rejected": self.rejected,
            "uptime_s": elapsed,
            # torchrl's keys (its requests/s is ours too: over the last 5 s rather than since the start)
            "batches_per_s": self.batches / elapsed,
            "avg_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "p50_queue_ms": _ms(_pct(qw, 0.5)) or 0.0,
            "p95_queue_ms": _ms(_pct(qw, 0.95)) or 0.0,
            "p50_forward_ms": _ms(_pct(fw, 0.5)) or 0.0,
            "p95_forward_ms": _ms(_pct(fw, 0.95)) or 0.0,
            "weight_updates": self.weight_updates,
        }


class NoStats(ServerStats):
    """``collect_stats=False``: nothing is recorded (the keys are still there, at zero)."""

    def record_batch(self, n: int, t_forward: float, t_done: float, submit_times) -> None:
        pass

    def record_waits(self, t_drain: float, submit_times) -> None:
        pass


def format_stats(s: dict) -> str:
    """A short multi-line summary of a :meth:`InferenceServer.stats` dict."""
    def f(d):
        return " ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in d.items())

    return (
        f"requests={s['requests']} batches={s['batches']} mean_batch={s['mean_batch_size']:.2f} "
        f"req/s={s['requests_per_s']:.0f} policy_version={s['policy_version']} errors={s['errors']}\n"
        f"  queue_wait_ms: {f(s['queue_wait_ms'])}\n"
        f"  forward_ms:    {f(s['forward_ms'])}\n"
        f"  latency_ms:    {f(s['latency_ms'])}\n"
        f"  batch_size_hist: {s['batch_size_hist']}"
    )
