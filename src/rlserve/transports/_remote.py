"""Pieces shared by the transports whose callers live in other processes (Ray, Monarch).

* the wire codec (:mod:`._codec`): a flat TensorDict of CPU tensors travels
  as one ``bytes`` object. Both engines pass ``bytes`` through untouched,
  while a tuple of numpy arrays costs Ray ~15 us of serialisation each way
  and a TensorDict ~100 us. Anything else travels as the TensorDict itself;
* replies are the encoded row (``bytes``), ``("ok", TensorDict)`` for
  TensorDicts the codec cannot flatten, or ``("err", exception)``, so an
  error reaches the one caller that caused it with its own type, and the
  remote engine never sees an exception it might treat as an actor failure;
* :class:`RemoteQueue`: the in-actor queue between the threads that receive
  remote requests (Ray's request threads, Monarch's endpoint) and the
  :class:`~rlserve.InferenceServer` thread; :class:`WaiterQueueTransport`
  is its Ray form;
* :class:`HostedServerMixin`: what RayTransport and MonarchTransport share as
  transports whose server runs either in the driver or, given a
  ``policy_factory``, in an actor of their own.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Sequence

from .._td import TensorDictBase, flat_leaves
from ..errors import ServerClosedError, picklable_exception
from ..transport import ServerHandle, TransportCapabilities, wait_live
from ._codec import decode_td, encode_flat_rows, encode_td
from ._turns import Waiter
from .threading import ThreadingTransport

__all__ = ["encode_td", "decode_td", "encode_rows", "encode_replies", "reply_of", "reply_error", "unwrap_reply",
           "RemoteQueue", "WaiterQueueTransport", "HostedServerMixin"]

log = logging.getLogger("rlserve")


def encode_rows(out: TensorDictBase) -> list:
    """The replies of a batched, version-stamped output: one per row."""
    d = flat_leaves(out)
    rows = encode_flat_rows(d, out.batch_size) if d is not None else None
    if rows is None:  # general path: rows as TensorDicts
        rows = [("ok", row) for row in out.unbind(0)]
    return rows


def encode_replies(out: TensorDictBase, n: int) -> list:
    """The ``n`` replies of a batch output; if it cannot be encoded, every caller gets the error."""
    try:
        return encode_rows(out)
    except Exception as e:
        return [reply_error(e)] * n


def reply_of(row: TensorDictBase) -> Any:
    """The reply carrying one answer row."""
    payload = encode_td(row)
    return payload if type(payload) is bytes else ("ok", payload)


def reply_error(exc: BaseException) -> tuple:
    """An error reply that is sure to pickle (the model's own exception may not)."""
    return ("err", picklable_exception(exc))


def unwrap_reply(reply: Any) -> TensorDictBase:
    """Turn a reply into the answer, or raise the error it carries."""
    if type(reply) is bytes:
        return decode_td(reply)
    kind, value = reply
    if kind == "ok":
        return decode_td(value)
    raise value


class RemoteQueue(ThreadingTransport):
    """In-actor queue for requests that arrive from other processes on engine threads.

    Answers go back whole batch at a time, encoded once per batch
    (``resolve_batch``); a subclass says how a reply reaches its caller
    (``_reply``). When the server is idle, the receiving thread runs the batch
    itself (``run_in_caller``): no hand-over to the server thread and back;
    only while forwards average under ``inline_max_forward_s``.
    """

    capabilities = TransportCapabilities(
        whole_batches=True, timed_drain=True, pending_count=True, wakeable=True, inline_batches=True)

    inline_max_forward_s: float = math.inf

    def enqueue(self, payload: Any, callback: Any) -> tuple | None:
        """Queue one remote request; returns the error reply if it was not queued, else None."""
        try:
            self.check_alive()
            td = decode_td(payload)
        except BaseException as e:  # anything, even a SystemExit from unpickling: this caller's error
            return reply_error(e)
        try:
            self._put(td, callback, None, self.inline_max_forward_s)
        except Exception as e:  # refused before it was queued (shut down, queue full)
            return reply_error(e)
        except BaseException as e:
            # Only a batch run here raises these (the model raised SystemExit, ...): that batch
            # answered its callers, this one included, and stopped the server.
            log.error("rlserve: a batch run on a remote request's thread stopped the server: %r", e)
        return None

    def _reply(self, callback: Any, reply: Any) -> None:
        callback.set_result(reply)

    def resolve_batch(self, callbacks: Sequence, batch: TensorDictBase, policy_version: int) -> None:
        for cb, r in zip(callbacks, encode_replies(batch, len(callbacks))):
            self._reply(cb, r)

    def resolve(self, callback: Any, result: TensorDictBase) -> None:
        self._reply(callback, reply_of(result))

    def resolve_exception(self, callback: Any, exc: BaseException) -> None:
        self._reply(callback, reply_error(exc))


class WaiterQueueTransport(RemoteQueue):
    """Ray's in-actor queue: each request *thread* blocks on its own reusable lock.

    Ray runs each ``infer`` call in one of its request threads, which enqueues
    and blocks (GIL released) until the server thread hands it the encoded
    row. One thread hop each way; no event loop to wake (measured ~25% less
    server CPU per request than an async actor awaiting futures on its loop).
    """

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    def call(self, payload: Any) -> Any:
        """Serve one encoded request on the calling thread; returns the reply."""
        local = self._local
        try:
            w = local.waiter
        except AttributeError:
            w = local.waiter = Waiter()
        refused = self.enqueue(payload, w)
        if refused is not None:
            return refused
        # The server answers every request it accepted, even when it dies or shuts
        # down; the liveness check covers a server that can no longer.
        try:
            wait_live(lambda s: w.lock.acquire(timeout=s), self, None)
        except ServerClosedError as e:
            local.waiter = Waiter()  # a late answer must not reach the next call
            return reply_error(e)
        r = w.result
        w.result = None
        return r


class HostedServerMixin:
    """Server in the driver, or (``policy_factory``) in an actor the transport owns.

    For a transport class that sets ``_engine`` (``"Ray"``, ``"Monarch"``: its
    name is ``<engine>Transport``) and ``_hosted`` in ``__init__``, and has a
    ``shutdown()``; list it before the transport base so ``bind`` reaches it.
    """

    _engine = ""
    _hosted = False

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _need_hosted(self, what: str) -> None:
        if not self._hosted:
            raise RuntimeError(
                f"{what}() is for a server hosted in a {self._engine} actor; use the InferenceServer in the driver")

    def bind(self, server: ServerHandle) -> None:
        if self._hosted:  # clients call the actor, so a server here would get no requests
            raise RuntimeError(
                f"this {self._engine}Transport already runs its own InferenceServer in a {self._engine} actor "
                "(policy_factory); do not wrap it in another InferenceServer"
            )
        super().bind(server)
