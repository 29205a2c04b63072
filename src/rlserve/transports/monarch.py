"""MonarchTransport: actors in Monarch process meshes; one endpoint call per request.

Built only on torchmonarch's actor API (``monarch.actor``: ``Actor``,
``endpoint``/``concurrent_endpoint``, ``this_host``/``this_proc``); it never
imports Monarch's torch-linked tensor engine (``monarch.common._C`` and
friends are built for another torch). Tested with torchmonarch 0.7.0.

Two ways to host the server (see docs/monarch.md):

* **in a Monarch actor** -- ``MonarchTransport(policy_factory=make_policy, server_kwargs=...)``
  spawns one process, builds the policy there and serves it. Each request is one
  ``call_one`` of an endpoint that only enqueues the request with its response
  port; the server batches whatever calls are pending and sends each row
  straight into its caller's port.
* **in the driver** -- ``InferenceServer(policy, MonarchTransport())``: the
  endpoint actor is spawned *in the driver process* (``this_proc().spawn``) and
  enqueues straight into this transport's queue, so requests still cost one
  Monarch call and no extra hop.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._td import TensorDictBase

from ..errors import AnswerTimeout, RequestError, ServerDeadError
from ..interaction import with_caller_mode
from ..transport import InferenceClient
from ._remote import HostedServerMixin, RemoteQueue, encode_td, reply_error, unwrap_reply

__all__ = ["MonarchTransport", "MonarchClient"]

log = logging.getLogger("rlserve")

# transports whose endpoint actor lives in this (driver) process, by key
_LOCAL: dict = {}
_keys = itertools.count()


def _monarch():
    # Faster failure detection: Monarch's supervision polls every 10 s by default.
    os.environ.setdefault("HYPERACTOR_MESH_SUPERVISION_POLL_FREQUENCY", "1s")
    try:
        import monarch.actor as ma
    except ImportError:
        raise ImportError("MonarchTransport needs torchmonarch: pip install 'rlserve[monarch]'") from None
    return ma


def _is_supervision_error(e: BaseException) -> bool:
    """Only these mean the server actor (or its process) is dead."""
    return type(e).__name__ in ("SupervisionError", "MeshFailure")


def _translate(e: BaseException) -> BaseException:
    if isinstance(e, TimeoutError):
        return e
    if _is_supervision_error(e):
        err = ServerDeadError(f"the Monarch server actor is gone ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        err.__cause__ = e
        return err
    if type(e).__name__ == "ActorError":
        # The endpoint call itself failed (e.g. the request did not unpickle on the
        # server) while the actor lives on: the caller's own error, not a dead server.
        inner = getattr(e, "exception", None)
        if isinstance(inner, BaseException):
            return inner
        err = RequestError(f"the server could not run this request: {str(e).splitlines()[0] if str(e) else e!r}")
        err.__cause__ = e
        return err
    return e


class MonarchClient(InferenceClient):
    """Actor-side client; picklable (holds the server's single-actor mesh)."""

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self, ref):
        super().__init__(None)  # no transport object here: the actor mesh is the way in
        self._ref = ref

    def __reduce__(self):
        return (MonarchClient, (self._ref,))

    def __call__(self, td, timeout: float | None = None):
        payload = encode_td(with_caller_mode(td))
        try:
            reply = self._ref.infer.call_one(payload).get(timeout=timeout)
        except TimeoutError:
            raise AnswerTimeout(f"no answer from the inference server within {timeout} s") from None
        except BaseException as e:
            raise _translate(e) from None
        return unwrap_reply(reply)

    def submit(self, td: TensorDictBase) -> Future:
        """Send now; the returned Future is completed by a small waiter pool in this process."""
        mfut = self._ref.infer.call_one(encode_td(with_caller_mode(td)))
        cls = type(self)
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(32, thread_name_prefix="rlserve-monarch-wait")

        def wait():
            try:
                reply = mfut.get()
            except BaseException as e:
                raise _translate(e) from None
            return unwrap_reply(reply)

        return cls._pool.submit(wait)


class PortQueueTransport(RemoteQueue):
    """In-actor queue whose callbacks are Monarch response ports.

    The endpoint (``explicit_response_port``) only enqueues ``(request, port)``
    and returns, so the actor is free for the next message at once; the server
    thread sends each encoded row straight into its caller's port. Against an
    async endpoint awaiting a future resolved through the actor's event loop,
    this saves a loop wake-up and a coroutine per request.
    """

    # Monarch runs a sync actor's endpoint calls one at a time: while a batch runs on the
    # endpoint thread, the next requests wait in the mailbox and cannot join it. So only
    # while forwards take this long on average (the hand-over it saves costs about as much).
    inline_max_forward_s = 0.0002

    def accept(self, port: Any, payload: Any) -> None:
        """Endpoint body: enqueue, or answer at once with the error (never raise: that fails the actor).

        An idle server whose forwards are short runs the batch right here, on
        the endpoint's thread (see ``InferenceServer(run_in_caller=...)``): no
        hand-over to the server thread and back.
        """
        refused = self.enqueue(payload, port)
        if refused is not None:
            _send(port, refused)

    def _reply(self, callback, reply) -> None:
        _send(callback, reply)


def _send(port, reply) -> None:
    try:
        port.send(reply)
        return
    except Exception as e:  # the answer does not pickle, or the caller is gone
        first = e
    try:  # an error reply always pickles: if this fails too, nobody is listening
        port.send(reply_error(RuntimeError(
            f"the server could not send its answer ({type(first).__name__}: {first})")))
    except Exception as e:
        log.debug("rlserve: could not answer a Monarch caller (gone?): %r / %r", first, e)
        return
    log.warning("rlserve: could not send an answer to a Monarch caller; sent it the error: %r", first)


def _actor_classes():
    """Define the actor classes on first use, so importing this module needs no Monarch."""
    global _ServerActor, _Gateway
    if "_ServerActor" in globals():
        return _ServerActor, _Gateway
    ma = _monarch()

    class _ServerActor(ma.Actor):
        """Policy from a factory + InferenceServer, in its own Monarch process."""

        def __init__(self, policy_factory, server_kwargs, max_queue_size=None):
            from ..hosted import HostedServer

            self._transport = PortQueueTransport(max_pending=max_queue_size, block_when_full=False)
            self._hosted = HostedServer(policy_factory, self._transport, server_kwargs)

        @ma.endpoint(explicit_response_port=True)
        def infer(self, port, payload):
            self._transport.accept(port, payload)

        # Monarch forbids mixing sync and async endpoints in one actor: all sync.
        @ma.endpoint
        def stats(self):
            return self._hosted.stats()

        @ma.endpoint
        def pid(self):
            return self._hosted.pid()

        @ma.endpoint
        def update_weights(self, weights, version=None, mark_weight_update=True):
            # bad weights: the caller gets its ValueError, the actor lives on
            return self._hosted.command("update_weights", weights, version, mark_weight_update)

        @ma.endpoint
        def shutdown(self):
            self._hosted.shutdown()

    class _Gateway(ma.Actor):
        """Endpoint actor living in the driver: enqueues into the driver's transport."""

        def __init__(self, key):
            self._key = key

        @ma.endpoint(explicit_response_port=True)
        def infer(self, port, payload):
            tr = _LOCAL.get(self._key)
            if tr is None:
                _send(port, reply_error(ServerDeadError("the driver's MonarchTransport is gone")))
            else:
                tr.accept(port, payload)

    _ServerActor.__module__ = _Gateway.__module__ = __name__
    _ServerActor.__qualname__, _Gateway.__qualname__ = "_ServerActor", "_Gateway"
    globals()["_ServerActor"], globals()["_Gateway"] = _ServerActor, _Gateway
    return _ServerActor, _Gateway


def _log_mesh_failure(failure) -> None:
    log.warning("rlserve: a Monarch mesh failed (clients will get ServerDeadError): %s", str(failure).splitlines()[0])


def _keep_driver_alive(ma) -> None:
    """Monarch's default fault hook exits the driver when an owned mesh fails; log instead."""
    ma.unhandled_fault_hook = _log_mesh_failure


class MonarchTransport(HostedServerMixin, PortQueueTransport):
    """Serve Monarch actors; the server runs in the driver or in a Monarch actor.

    Args:
        policy_factory: when given, spawn one Monarch process, build the policy
            there with ``policy_factory()`` (picklable; defined in an importable
            module or in ``__main__``) and serve it; else use this transport with
            an ``InferenceServer`` in the driver.
        server_kwargs: keyword arguments of that ``InferenceServer``.
        procs: a ``ProcMesh`` of one process to host the server (default: a new one).
        keep_driver_alive: replace Monarch's fault hook (which ends the driver
            when a mesh it owns fails) by a warning, so a dead server becomes
            :class:`~rlserve.ServerDeadError` for clients instead.
        max_queue_size: refuse requests beyond this many pending
            (:class:`~rlserve.QueueFullError` to that caller); ``None``: no bound.

    Needs torchmonarch (``pip install 'rlserve[monarch]'``), tested with 0.7.0.
    """

    _engine = "Monarch"

    def __init__(self, policy_factory=None, *, server_kwargs: dict | None = None, procs=None,
                 keep_driver_alive: bool = True, max_queue_size: int | None = None):
        # max_queue_size: more pending requests than this are refused (QueueFullError to that caller)
        super().__init__(max_pending=max_queue_size, block_when_full=False)
        self.max_queue_size = max_queue_size
        ma = _monarch()
        if keep_driver_alive:
            _keep_driver_alive(ma)
        server_cls, gateway_cls = _actor_classes()
        self._hosted = policy_factory is not None
        self._own_procs = None
        self._key = None
        if self._hosted:
            if procs is None:
                procs = self._own_procs = ma.this_host().spawn_procs()
            try:
                mesh = procs.spawn(f"rlserve_server_{next(_keys)}", server_cls, policy_factory,
                                   dict(server_kwargs or {}), max_queue_size)
                self._ref = _single(mesh)
                self._ref.stats.call_one().get(timeout=120)  # built and serving (surfaces factory errors)
            except Exception as e:
                self._stop_own_procs(10.0)  # leave no orphan process behind
                raise RuntimeError(f"policy_factory failed: {_first_line(e)}") from e
        else:
            if server_kwargs:
                raise ValueError("server_kwargs only apply with policy_factory (server in a Monarch actor)")
            self._key = f"{os.getpid()}-{next(_keys)}"
            _LOCAL[self._key] = self
            self._ref = _single(ma.this_proc().spawn(f"rlserve_gateway_{self._key}", gateway_cls, self._key))

    @property
    def actor(self) -> Any:
        """The single-actor mesh clients call."""
        return self._ref

    def client(self) -> MonarchClient:
        return MonarchClient(self._ref)

    def stats(self, timeout: float = 30.0) -> dict:
        """The Monarch-hosted server's stats."""
        self._need_hosted("stats")
        return self._ref.stats.call_one().get(timeout=timeout)

    def update_weights(self, weights: Any, version: int | None = None, timeout: float = 60.0, *,
                       mark_weight_update: bool = True) -> int:
        """Hand weights to the Monarch-hosted server; returns the version answers will carry
        (``mark_weight_update=False``: the current one).

        Checked in the server process (ValueError for missing keys or wrong
        shapes; the old weights keep serving). Once this returns, every request
        sent afterwards is answered with these weights (or newer): the server
        applies them before its next batch.
        """
        self._need_hosted("update_weights")
        kind, value = self._ref.update_weights.call_one(weights, version, mark_weight_update).get(timeout=timeout)
        if kind != "ok":
            raise value
        return value

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the hosted server and its process (if this transport spawned it)."""
        if self._hosted:
            try:
                self._ref.shutdown.call_one().get(timeout=timeout)
            except Exception:  # already dead: stopping the procs settles it
                pass
            self._stop_own_procs(timeout)
        else:
            _LOCAL.pop(self._key, None)

    def _stop_own_procs(self, timeout: float) -> None:
        procs, self._own_procs = self._own_procs, None
        if procs is not None:
            try:
                procs.stop().get(timeout=timeout)
            except Exception as e:
                log.warning("rlserve: stopping the Monarch server process failed: %r", e)

    def __reduce__(self):
        raise TypeError("MonarchTransport stays in the driver; pass transport.client() to actors instead")


def _first_line(e: BaseException) -> str:
    """Monarch errors carry whole remote tracebacks: keep the headline."""
    inner = getattr(e, "exception", None)
    if isinstance(inner, BaseException):
        e = inner
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if "Traceback" in str(e) and lines:  # a remote traceback: its last line is the error
        return lines[-1]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _single(mesh):
    """The one-actor view of a mesh of size one (what ``call_one`` needs)."""
    return mesh


def __getattr__(name):
    # Monarch children unpickle the actor classes by reference: build them on demand.
    if name in ("_ServerActor", "_Gateway"):
        return dict(zip(("_ServerActor", "_Gateway"), _actor_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
