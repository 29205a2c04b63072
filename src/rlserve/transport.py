"""The transport contract between actor-side clients and the server loop.

A transport only moves requests and answers; batching lives in the server.
Subclasses implement the five abstract methods below. They may also offer the
optional hooks the server uses when present:

* ``drain_timed(max_items) -> (inputs, callbacks, submit_times)`` so queue
  wait and the batching deadline count from each request's real arrival
  (``time.perf_counter`` clock);
* ``resolve_batch(callbacks, batch_output, None)`` with the class attribute
  ``wants_rows = False``: the server hands over each batch output unsplit and
  the transport answers all its rows at once (stamping ``policy_version``
  itself); it must answer every row or raise before answering any;
* ``_wake()`` so shutdown does not wait for ``wait_for_work`` to time out;
* ``_pending() -> int`` (in-process transports only): requests waiting to be
  drained, so the server can hand the GIL to actor threads about to resubmit;
* ``_wait_for_count(n, timeout)`` with the class attribute
  ``_callers_resubmit = True`` (in-process transports whose callers are
  actor threads that resubmit at once): sleep until ``n`` requests are
  queued; after answering a batch the server waits, bounded, for those
  threads' next requests before its next forward;
* ``_wake_answered()``, called after each delivered batch (whatever the
  path: rows or ``resolve_batch``), and ``_release_answered()``, called when
  the server stops waiting for its callers, goes idle, or exits:
  ThreadingTransport's ``resolve`` parks blocked callers and these wake them
  in turn (see ``transports/threading.py``);
* ``_attach(server)`` (in-process transports only) may take
  ``server._caller_hook()``: ``None``, or a function a blocking caller's thread
  may call after queueing its request while the server sleeps; it runs that
  batch on the caller's thread and returns True, or returns False (then wake
  the server).
"""
from __future__ import annotations

import abc
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from ._td import TensorDictBase
from .errors import ServerClosedError

__all__ = ["InferenceTransport", "InferenceClient", "wait_future"]

# How often a blocked caller re-checks that the server is still alive.
LIVENESS_PERIOD_S = 0.2


class InferenceTransport(abc.ABC):
    """Abstract base class of transport backends (threads, processes, Ray, Monarch)."""

    # Set by the server while it runs; clients consult it before and while
    # waiting so that a stopped or dead server turns into an exception.
    _server = None

    @abc.abstractmethod
    def submit(self, td: TensorDictBase) -> Future:
        """Submit one request (actor side); returns a Future of the answer."""

    @abc.abstractmethod
    def drain(self, max_items: int) -> tuple[list, list]:
        """Take up to ``max_items`` pending requests (server side): ``(inputs, callbacks)``."""

    @abc.abstractmethod
    def wait_for_work(self, timeout: float) -> None:
        """Block until work may be pending or ``timeout`` seconds pass (server side)."""

    @abc.abstractmethod
    def resolve(self, callback, result: TensorDictBase) -> None:
        """Send ``result`` to the caller behind ``callback`` (server side)."""

    @abc.abstractmethod
    def resolve_exception(self, callback, exc: BaseException) -> None:
        """Send ``exc`` to the caller behind ``callback`` (server side)."""

    def client(self) -> "InferenceClient":
        """An actor-side client bound to this transport."""
        return InferenceClient(self)

    # -- liveness, shared by every transport ---------------------------------
    def _attach(self, server) -> None:
        if self._server is not None and self._server is not server and self._server.is_alive:
            raise RuntimeError("this transport is already served by another running InferenceServer")
        self._server = server

    def _may_still_answer(self) -> bool:
        """True while a (possibly shutting-down) server may still answer accepted requests."""
        server = self._server
        return server is not None and server._thread_running()

    def check_alive(self) -> None:
        """Raise ServerClosedError/ServerDeadError unless a server is serving this transport."""
        server = self._server
        if server is None:
            raise ServerClosedError("no InferenceServer is running on this transport; call server.start() first")
        server._raise_if_not_serving()


class InferenceClient:
    """Actor-side handle: ``client(td)`` blocks for the answer, ``client.submit(td)`` returns a Future."""

    def __init__(self, transport: InferenceTransport):
        self._transport = transport

    def submit(self, td: TensorDictBase) -> Future:
        """Submit one request; returns a ``concurrent.futures.Future``."""
        self._transport.check_alive()
        return self._transport.submit(td)

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        """Submit ``td`` and wait for its answer (at most ``timeout`` seconds)."""
        return wait_future(self.submit(td), timeout, self._transport)


def wait_future(fut: Future, timeout: float | None, transport) -> object:
    """``fut.result(timeout)`` that also raises once the server can no longer answer."""
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = LIVENESS_PERIOD_S
        if deadline is not None:
            step = min(step, deadline - time.monotonic())
            if step <= 0:
                fut.cancel()
                raise TimeoutError(f"no answer from the inference server within {timeout} s")
        try:
            return fut.result(timeout=step)
        except FutureTimeout:
            if fut.done():  # resolved in the instant the wait timed out (or the model raised TimeoutError)
                return fut.result()
            try:
                transport.check_alive()
            except ServerClosedError as gone:
                if not transport._may_still_answer():
                    try:
                        return fut.result(timeout=0.01)  # one last look: it may have just landed
                    except FutureTimeout:
                        raise gone from None
