"""Exceptions raised by rlserve. All derive from :class:`RLServeError`."""
from __future__ import annotations

import pickle
import queue


class RLServeError(RuntimeError):
    """Base class of every error rlserve raises on its own account."""


class ServerClosedError(RLServeError):
    """The server was shut down (or never started); the request was not run."""


class ServerDeadError(ServerClosedError):
    """The server thread or process died; the request was not (or not fully) run."""


class QueueFullError(RLServeError):
    """The transport's bound on pending requests was reached."""


class AnswerTimeout(TimeoutError, queue.Empty):
    """A call's ``timeout`` passed before its answer came. A ``TimeoutError``, and a
    ``queue.Empty`` as torchrl's mailbox and slot clients raise, so either ``except`` catches it."""


class RequestError(RLServeError, ValueError):
    """A request could not be batched or run (bad type, keys, shapes or dtypes)."""


def picklable_exception(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else an RLServeError carrying its text (errors cross processes)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RLServeError(f"{type(exc).__name__}: {exc}")
