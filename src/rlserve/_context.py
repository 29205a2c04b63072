"""Which transport's batch the current thread is running, if any.

A blocking call into the same server from inside one of its batches (the
model calling a client, or a ``submit`` done-callback, which runs while the
batch is answered) would wait for itself forever. Clients read
``state.transport`` before they block and raise :func:`reentry_error` instead.
"""
from __future__ import annotations

import threading
from typing import Any

__all__ = ["state", "reentry_error"]


class _State(threading.local):
    #: the transport whose batch this thread is running (None: none); set by the server
    transport: Any = None


state = _State()


def reentry_error() -> RuntimeError:
    """The error for a blocking call made from inside a batch of the same server."""
    return RuntimeError(
        "a blocking call to an InferenceServer was made from inside one of its own batches (from the "
        "model, or from a done-callback of a submit() future, which runs while the server answers); it "
        "would wait for itself forever. Use client.submit(td) there, and do not wait on its result"
    )
