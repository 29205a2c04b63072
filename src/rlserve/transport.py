"""The contract between the :class:`~rlserve.InferenceServer` and its transports.

Two halves, both explicit:

* :class:`InferenceTransport` is what a transport offers the server. The
  seed's five abstract methods (``submit``, ``drain``, ``wait_for_work``,
  ``resolve``, ``resolve_exception``) are all a user's transport must write;
  every other method of the contract has a default here, so such a transport
  is served unchanged. rlserve's own transports override the defaults to go
  fast, and say what they can do in :attr:`InferenceTransport.capabilities`
  (data, read once by the server; nothing is probed).
* :class:`ServerHandle` is what the server offers a transport, handed over by
  :meth:`InferenceTransport.bind` when the server starts: raise if closed, the
  current policy version, run one batch on the calling thread, and a few
  facts. A transport never sees the server object itself.

The server calls, on its own thread: ``wait_for_work`` and ``drain_timed`` to
gather a batch; ``resolve_rows`` (or ``resolve_batch`` for a transport that
declares ``whole_batches``) and ``resolve_exception`` to answer it;
``on_batch_done`` after each batch and ``on_idle`` when it finds nothing to
do or exits. From other threads it calls only ``bind``, ``open``, ``close``
and ``wake``.
"""
from __future__ import annotations

import abc
import math
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence

from tensordict.nn import TensorDictModuleBase

from ._td import TensorDictBase
from .errors import AnswerTimeout, ServerClosedError
from .interaction import with_caller_mode

if TYPE_CHECKING:
    from tensordict import NestedKey

__all__ = [
    "InferenceTransport",
    "InferenceClient",
    "TransportCapabilities",
    "ServerHandle",
    "ForeignTransport",
    "as_transport",
    "wait_live",
    "wait_future",
    "LIVENESS_PERIOD_S",
]

# How often a blocked caller re-checks that the server is still alive.
LIVENESS_PERIOD_S = 0.2
_perf = time.perf_counter


@dataclass(frozen=True)
class TransportCapabilities:
    """What a transport can do, declared as data (the server reads it once, at construction).

    Attributes:
        whole_batches: the transport answers a whole batch at once through
            :meth:`InferenceTransport.resolve_batch` (the server does not split
            the output into rows); it must answer every row or raise before
            answering any.
        timed_drain: :meth:`InferenceTransport.drain_timed` reports each
            request's real arrival time, so queue waits and the batching
            deadline count from arrival (else from the drain).
        pending_count: :meth:`InferenceTransport.pending` counts the requests
            queued and not yet drained.
        callers_resubmit: callers are threads of the server's own process
            that submit again as soon as they are answered; the transport may
            hold the server back briefly after a batch so their next requests
            join the next one (see ``ThreadingTransport``).
        wakeable: :meth:`InferenceTransport.wake` interrupts
            ``wait_for_work`` (prompt shutdown); else shutdown waits for the
            current ``wait_for_work`` to time out (at most 50 ms).
        inline_batches: the transport may ask the server to run a batch on a
            caller's thread (:meth:`ServerHandle.run_inline`).
    """

    whole_batches: bool = False
    timed_drain: bool = False
    pending_count: bool = False
    callers_resubmit: bool = False
    wakeable: bool = False
    inline_batches: bool = False


class ServerHandle(Protocol):
    """The part of a running :class:`~rlserve.InferenceServer` a transport may use."""

    @property
    def accepting(self) -> bool:
        """True while the server accepts requests (one flag read: the hot path)."""

    def raise_if_closed(self) -> None:
        """Raise ServerClosedError (or ServerDeadError, with the cause) unless accepting."""

    def may_still_answer(self) -> bool:
        """True while the server may still answer requests it accepted (even while shutting down)."""

    @property
    def died(self) -> BaseException | None:
        """What killed the serving loop, or None."""

    @property
    def stopping(self) -> bool:
        """True once shutdown began (a transport's bounded waits end early)."""

    @property
    def policy_version(self) -> int:
        """Version of the weights the next batch runs with."""

    @property
    def policy_version_key(self) -> NestedKey | None:
        """Key of the version stamp in answers (None: no stamp)."""

    @property
    def max_batch_size(self) -> int:
        """Most requests per forward."""

    @property
    def inline_allowed(self) -> bool:
        """True when the server lets callers' threads run batches (``run_in_caller``, greedy batching)."""

    def run_inline(self, max_forward_s: float = math.inf) -> bool:
        """Run one batch of whatever is queued on the calling thread, if the server is idle.

        Only while the server's forwards average under ``max_forward_s``.
        Returns False, having done nothing, when it cannot (busy, inline runs
        disabled, the caller's thread has torch modes that would leak into the
        forward); the transport then wakes the server as usual.
        """

    def in_batch(self) -> bool:
        """True on a thread that is running one of this server's batches (the
        model, a done-callback): a blocking call to the same server there would
        wait for itself."""


class InferenceTransport(abc.ABC):
    """Base class of transport backends: the seed's five methods plus the server contract.

    Subclass it and implement the five abstract methods; the defaults of the
    other methods serve such a transport as it is. See the module docstring
    for who calls what, and when.
    """

    #: What this transport can do; see :class:`TransportCapabilities`.
    capabilities: ClassVar[TransportCapabilities] = TransportCapabilities()

    # The handle of the server serving this transport (set by bind()).
    _server: ServerHandle | None = None

    # -- the seed's five methods -------------------------------------------------
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
    def resolve(self, callback: Any, result: TensorDictBase) -> None:
        """Send ``result`` to the caller behind ``callback`` (server side)."""

    @abc.abstractmethod
    def resolve_exception(self, callback: Any, exc: BaseException) -> None:
        """Send ``exc`` to the caller behind ``callback`` (server side)."""

    def client(self) -> InferenceClient:
        """An actor-side client bound to this transport."""
        return InferenceClient(self)

    # -- lifecycle (called by the server) ----------------------------------------
    def bind(self, server: ServerHandle) -> None:
        """Called by ``server.start()``: from now on ``server`` serves this transport.

        Raises RuntimeError if another live server serves it already.
        """
        current = self._server
        if current is not None and current is not server and current.may_still_answer():
            raise RuntimeError("this transport is already served by another running InferenceServer")
        self._server = server

    @property
    def server(self) -> ServerHandle | None:
        """The handle of the server bound to this transport (None before any start)."""
        return self._server

    def open(self) -> None:
        """The server starts serving: accept requests (called after ``bind``)."""

    def close(self) -> None:
        """The server stops: refuse new requests; the server then fails whatever is still queued."""

    def wake(self) -> None:
        """Make a pending ``wait_for_work`` return now (declare ``wakeable``)."""

    # -- the batch path (server thread) ------------------------------------------
    def drain_timed(self, max_items: int) -> tuple[list, list, list[float]]:
        """``drain`` plus each request's arrival time (``time.perf_counter`` clock).

        The default stamps the drain time; declare ``timed_drain`` when
        overriding it with real arrival times.
        """
        inputs, callbacks = self.drain(max_items)
        return inputs, callbacks, [_perf()] * len(inputs)

    def pending(self) -> int:
        """Requests queued and not yet drained (declare ``pending_count``); default 0."""
        return 0

    def resolve_rows(self, callbacks: Sequence, rows: Sequence[TensorDictBase]) -> None:
        """Answer one batch, row by row. The default calls ``resolve`` for each;
        one caller that cannot be reached does not cost the others their answer."""
        resolve = self.resolve
        for cb, row in zip(callbacks, rows):
            try:
                resolve(cb, row)
            except Exception:
                _log_delivery_failure()

    def resolve_batch(self, callbacks: Sequence, batch: TensorDictBase, policy_version: int) -> None:
        """Answer a whole batch at once (transports declaring ``whole_batches``).

        ``batch`` is the model's output with the leading batch dimension, the
        version already stamped; row ``i`` goes to ``callbacks[i]``. Answer
        every row or raise before answering any.
        """
        raise NotImplementedError(f"{type(self).__name__} does not answer whole batches")

    def on_batch_done(self, n: int) -> None:
        """After each batch of ``n`` requests the serving loop ran, outside the serve lock."""

    def on_idle(self) -> None:
        """The serving loop found nothing to do, or is exiting: deliver anything held back."""

    def usage(self) -> dict:
        """Figures of the transport's own (clients, slots, fast/slow path counts); default none."""
        return {}

    # -- liveness (actor side) --------------------------------------------------------
    def check_alive(self) -> None:
        """Raise ServerClosedError/ServerDeadError once the server serving this transport stopped.

        Before any server started, requests queue (they are served once one starts).
        """
        server = self._server
        if server is not None:
            server.raise_if_closed()

    def may_still_answer(self) -> bool:
        """True while a server may still answer requests it accepted (or none has started yet)."""
        server = self._server
        return server is None or server.may_still_answer()


def _log_delivery_failure() -> None:
    import logging

    logging.getLogger("rlserve").exception("rlserve: could not deliver an answer")


_TRANSPORT_METHODS = ("submit", "drain", "wait_for_work", "resolve", "resolve_exception")


class ForeignTransport(InferenceTransport):
    """Serves an object that has the seed's five transport methods but does not
    derive from :class:`InferenceTransport` (a transport written for another library)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def submit(self, td: TensorDictBase) -> Future:
        return self.inner.submit(td)

    def drain(self, max_items: int) -> tuple[list, list]:
        return self.inner.drain(max_items)

    def wait_for_work(self, timeout: float) -> None:
        self.inner.wait_for_work(timeout)

    def resolve(self, callback: Any, result: TensorDictBase) -> None:
        self.inner.resolve(callback, result)

    def resolve_exception(self, callback: Any, exc: BaseException) -> None:
        self.inner.resolve_exception(callback, exc)

    def client(self) -> InferenceClient:
        return InferenceClient(self)


def as_transport(transport: Any) -> InferenceTransport:
    """``transport`` itself, or a :class:`ForeignTransport` around an object with the five methods."""
    if isinstance(transport, InferenceTransport):
        return transport
    missing = [m for m in _TRANSPORT_METHODS if not callable(getattr(transport, m, None))]
    if missing:
        raise TypeError(
            f"transport must be an InferenceTransport (or have its methods {list(_TRANSPORT_METHODS)}); "
            f"{type(transport).__name__} lacks {missing}"
        )
    return ForeignTransport(transport)


class InferenceClient(TensorDictModuleBase):
    """Actor-side handle: ``client(td)`` blocks for the answer, ``client.submit(td)`` returns a Future.

    A client is a ``tensordict.nn.TensorDictModuleBase``, so torchrl takes it
    as a TensorDict policy as it is (``env.rollout(policy=client)``,
    ``Collector(policy=client)``). Each request carries the caller's
    interaction type (:mod:`rlserve.interaction`).
    """

    # A client is a module only for what it is (a TensorDict policy); its own attributes are plain
    # ones, set without nn.Module's bookkeeping (which costs ~1 us per assignment on hot paths).
    __setattr__ = object.__setattr__

    def __init__(self, transport: InferenceTransport):
        super().__init__()
        self._in_keys = []
        self._out_keys = self._out_keys_apparent = []
        self._transport = transport

    def submit(self, td: TensorDictBase) -> Future:
        """Submit one request; returns a ``concurrent.futures.Future``."""
        self._transport.check_alive()
        return self._transport.submit(with_caller_mode(td))

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        """Submit ``td`` and wait for its answer (at most ``timeout`` seconds)."""
        return wait_future(self.submit(td), timeout, self._transport)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``client(tensordict)``: the answer (a policy's forward, for torchrl)."""
        return self(tensordict)


class _Liveness(Protocol):
    def check_alive(self) -> None: ...

    def may_still_answer(self) -> bool: ...


def check_timeout(timeout: float | None) -> float | None:
    """The deadline (``time.monotonic`` clock) of a call given ``timeout``; ValueError if negative."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
    return time.monotonic() + timeout


def wait_live(
    acquire: Callable[[float], bool],
    peer: _Liveness,
    deadline: float | None,
    *,
    accepted: bool = True,
    on_timeout: Callable[[], BaseException] | None = None,
    tick: Callable[[], bool] | None = None,
) -> None:
    """Block until ``acquire(step)`` returns True, noticing a dead or closed server.

    The one liveness wait of rlserve. ``acquire(seconds)`` waits at most that
    long for the awaited thing (an answer, a free slot) and says whether it
    came. Every :data:`LIVENESS_PERIOD_S` the wait checks ``peer``:

    * ``accepted=True`` (the server holds our request): a closing server still
      answers what it accepted, so the wait goes on while
      ``peer.may_still_answer()``; once it cannot, one last short look, then
      the ServerClosedError / ServerDeadError;
    * ``accepted=False`` (waiting for room to submit): a closed server raises at once.

    ``deadline`` (``time.monotonic``) bounds the whole wait: then
    ``on_timeout()`` is raised (default: TimeoutError). ``tick()``, called at
    each check, may end the wait by returning True.
    """
    while True:
        step = LIVENESS_PERIOD_S
        if deadline is not None:
            step = min(step, deadline - time.monotonic())
            if step <= 0:
                if acquire(0):
                    return
                raise on_timeout() if on_timeout is not None else AnswerTimeout(
                    "no answer from the inference server in time")
        if acquire(step):
            return
        if tick is not None and tick():
            return
        try:
            peer.check_alive()
        except ServerClosedError:
            if accepted and peer.may_still_answer():
                continue
            if accepted and acquire(0.01):  # one last look: it may have just landed
                return
            raise


def _future_waiter(fut: Future) -> Callable[[float], bool]:
    def acquire(seconds: float) -> bool:
        try:
            fut.exception(timeout=seconds)
        except FutureTimeout:
            return fut.done()
        except BaseException:  # cancelled
            return True
        return True

    return acquire


def wait_future(fut: Future, timeout: float | None, peer: _Liveness) -> Any:
    """``fut.result(timeout)`` that also raises once the server can no longer answer."""
    deadline = check_timeout(timeout)

    def timed_out() -> BaseException:
        fut.cancel()
        return AnswerTimeout(f"no answer from the inference server within {timeout} s")

    wait_live(_future_waiter(fut), peer, deadline, on_timeout=timed_out)
    return fut.result(timeout=0)
