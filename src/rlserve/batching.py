"""When to run a batch: a small policy object, testable without threads."""
from __future__ import annotations


class BatchPolicy:
    """Decides whether the pending requests form a batch now.

    A batch runs as soon as ``min_batch_size`` requests are pending (or
    ``max_batch_size``, whichever is smaller), or once the oldest pending
    request has waited ``timeout`` seconds since its own arrival: the deadline
    counts from arrival, not from when the server began to wait (as Triton's
    ``max_queue_delay``). With the default ``min_batch_size=1`` the server is
    greedy: it runs whatever is pending, and the next batch grows while the
    model is busy.
    """

    __slots__ = ("max_batch_size", "min_batch_size", "timeout")

    def __init__(self, max_batch_size: int, min_batch_size: int = 1, timeout: float = 0.01):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 1 <= int(min_batch_size) <= int(max_batch_size):
            raise ValueError(
                f"min_batch_size must be in [1, max_batch_size={max_batch_size}], got {min_batch_size}"
            )
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        self.max_batch_size = int(max_batch_size)
        self.min_batch_size = int(min_batch_size)
        self.timeout = float(timeout)

    def wait_time(self, n_pending: int, oldest_arrival: float, now: float) -> float:
        """Seconds to keep waiting for batch-mates; 0.0 means run now."""
        if n_pending >= self.min_batch_size:
            return 0.0
        return max(0.0, oldest_arrival + self.timeout - now)
