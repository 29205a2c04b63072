"""Which transport's batch the current thread is running, if any.

A blocking call into the same server from inside one of its batches (the
model calling a client, or a ``submit`` done-callback, which runs while the
batch is answered) would wait for itself forever. Clients ask
:func:`current` before they block and raise at once instead.
"""
from __future__ import annotations

import threading
from typing import Any

__all__ = ["enter", "leave", "current", "reentry_error"]

_tls = threading.local()


def enter(transport: Any) -> Any:
    """Mark this thread as running a batch of ``transport``; returns what to restore."""
    prev = getattr(_tls, "transport", None)
    _tls.transport = transport
    return prev


def leave(prev: Any) -> None:
    _tls.transport = prev


def current() -> Any:
    """The transport whose batch this thread is running, or None."""
    return getattr(_tls, "transport", None)


def reentry_error() -> RuntimeError:
    """The error for a blocking call made from inside a batch of the same server."""
    return RuntimeError(
        "a blocking call to an InferenceServer was made from inside one of its own batches (from the "
        "model, or from a done-callback of a submit() future, which runs while the server answers); it "
        "would wait for itself forever. Use client.submit(td) there, and do not wait on its result"
    )
