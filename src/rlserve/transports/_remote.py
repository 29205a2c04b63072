"""Pieces shared by the transports whose callers live in other processes (Ray, Monarch).

* the wire codec (:mod:`._codec`): a flat TensorDict of CPU tensors travels
  as one ``bytes`` object. Both engines pass ``bytes`` through untouched,
  while a tuple of numpy arrays costs Ray ~15 us of serialisation each way
  and a TensorDict ~100 us. Anything else travels as the TensorDict itself;
* replies are the encoded row (``bytes``), ``("ok", TensorDict)`` for
  TensorDicts the codec cannot flatten, or ``("err", exception)``, so an
  error reaches the one caller that caused it with its own type, and the
  remote engine never sees an exception it might treat as an actor failure;
* :class:`WaiterQueueTransport`: the in-actor queue between request threads
  (Ray threaded actor) and the :class:`~rlserve.InferenceServer` thread;
* :class:`HostedServerMixin`: what RayTransport and MonarchTransport share as
  transports whose server runs either in the driver or, given a
  ``policy_factory``, in an actor of their own.
"""
from __future__ import annotations

import logging
import pickle
import threading

import torch

from .._td import TensorDictBase, flat_leaves
from ..errors import ServerClosedError
from ..transport import LIVENESS_PERIOD_S
from ._codec import decode_td, encode_flat_rows, encode_td
from .threading import ThreadingTransport, _Waiter

__all__ = ["encode_td", "decode_td", "encode_rows", "reply_error", "unwrap_reply", "enqueue_remote",
           "WaiterQueueTransport", "HostedServerMixin"]

log = logging.getLogger("rlserve")


def _restore_batch_dim(out, n: int) -> None:
    """Give a batch-size-less output ``batch_size=[n]`` when every leaf leads with ``n``.

    E.g. TensorDictModule(inplace=False) returns a fresh TensorDict with no batch
    size; the in-process path (rlserve.collate.split_rows) accepts it the same way.
    """
    if out.batch_dims == 0 and not out.is_empty():
        try:
            out.batch_size = torch.Size([n])
        except RuntimeError:  # some leaf does not lead with n: the caller reports it
            pass


def encode_rows(out, n: int, version_key, version: int) -> list:
    """Split a batched model output into ``n`` encoded replies, stamping the version."""
    if not isinstance(out, TensorDictBase):
        raise TypeError(f"the model returned {type(out).__name__}, expected a TensorDict")
    _restore_batch_dim(out, n)
    if out.batch_dims == 0 or out.batch_size[0] != n:
        raise RuntimeError(
            f"the model returned batch_size={list(out.batch_size)} for a batch of {n} requests; "
            "it must keep the leading batch dimension"
        )
    d = flat_leaves(out)
    rows = encode_flat_rows(d, out.batch_size, n, version_key, version) if d is not None else None
    if rows is None:  # general path: rows as TensorDicts
        if version_key is not None:
            out.set(version_key, torch.full(out.batch_size, version, dtype=torch.int64))
        rows = [("ok", row) for row in out.unbind(0)]
    return rows


def encode_replies(server, batch_out, n: int) -> list:
    """The ``n`` wire replies of a batch output, stamped with ``server``'s version;
    if the output cannot be split, every caller gets the error instead."""
    try:
        return encode_rows(batch_out, n, server.policy_version_key, server.policy_version)
    except Exception as e:
        return [reply_error(e)] * n


def reply_error(exc: BaseException) -> tuple:
    """An error reply that is sure to pickle (the model's own exception may not)."""
    try:
        pickle.dumps(exc)
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return ("err", exc)


def unwrap_reply(reply) -> TensorDictBase:
    """Turn a reply into the answer, or raise the error it carries."""
    if type(reply) is bytes:
        return decode_td(reply)
    kind, value = reply
    if kind == "ok":
        return decode_td(value)
    raise value


def enqueue_remote(tr: ThreadingTransport, payload, callback, inline_max_forward_s: float | None = None):
    """Queue one remote request on ``tr``; returns the error reply if it was not queued, else None.

    An idle server's batch may run right here, on the receiving thread (see
    ``InferenceServer(run_in_caller=...)``); with ``inline_max_forward_s``,
    only while the server's forwards average less than that.
    """
    try:
        tr.check_alive()
        td = decode_td(payload)
    except BaseException as e:  # anything, even a SystemExit from unpickling: this caller's error
        return reply_error(e)
    s = tr._server
    inline = inline_max_forward_s is None or s._forward_avg_s < inline_max_forward_s
    try:
        tr._put(td, callback, None, inline)
    except Exception as e:  # refused before it was queued (shut down, queue full)
        return reply_error(e)
    except BaseException as e:
        # Only a batch run here raises these (the model raised SystemExit, ...): that batch
        # answered its callers, this one included, and stopped the server.
        log.error("rlserve: a batch run on a remote request's thread stopped the server: %r", e)
    return None


class WaiterQueueTransport(ThreadingTransport):
    """In-actor queue for request *threads*: each blocks on its own reusable lock.

    Used by the Ray server actor, a threaded actor: Ray runs each ``infer``
    call in one of its request threads, which enqueues and blocks (GIL
    released) until the server thread hands it the encoded row. One thread
    hop each way; no event loop to wake (measured ~25% less server CPU per
    request than an async actor awaiting futures on its loop). When the
    server is idle, the request thread runs the batch itself: no hop at all.
    """

    _callers_resubmit = False  # answers go to remote callers: none resubmits from this process

    wants_rows = False

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    def call(self, payload):
        """Serve one encoded request on the calling thread; returns the reply."""
        local = self._local
        try:
            w = local.waiter
        except AttributeError:
            w = local.waiter = _Waiter()
        refused = enqueue_remote(self, payload, w)
        if refused is not None:
            return refused
        # The server answers every request it accepted, even when it dies or
        # shuts down; the liveness check covers a server that can no longer.
        while not w.lock.acquire(timeout=LIVENESS_PERIOD_S):
            try:
                self.check_alive()
            except ServerClosedError as e:
                if self._may_still_answer():
                    continue
                if w.lock.acquire(timeout=0.01):  # one last look: it may have just landed
                    break
                local.waiter = _Waiter()  # a late answer must not reach the next call
                return reply_error(e)
        r = w.result
        w.result = None
        return r

    def resolve_batch(self, callbacks, batch_out, rows) -> None:
        replies = encode_replies(self._server, batch_out, len(callbacks))
        for cb, r in zip(callbacks, replies):
            cb.set_result(r)

    def resolve(self, callback, result) -> None:
        s = self._server
        callback.set_result(encode_rows(result.unsqueeze(0), 1, s.policy_version_key, s.policy_version)[0])

    def resolve_exception(self, callback, exc: BaseException) -> None:
        callback.set_result(reply_error(exc))


class HostedServerMixin:
    """Server in the driver, or (``policy_factory``) in an actor the transport owns.

    For a transport class that sets ``_engine`` (``"Ray"``, ``"Monarch"``: its
    name is ``<engine>Transport``) and ``_hosted`` in ``__init__``, and has a
    ``shutdown()``; list it before the transport base so ``_attach`` reaches it.
    """

    _engine = ""
    _hosted = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def _need_hosted(self, what):
        if not self._hosted:
            raise RuntimeError(
                f"{what}() is for a server hosted in a {self._engine} actor; use the InferenceServer in the driver")

    def _attach(self, server) -> None:
        if self._hosted:  # clients call the actor, so a server here would get no requests
            raise RuntimeError(
                f"this {self._engine}Transport already runs its own InferenceServer in a {self._engine} actor "
                "(policy_factory); do not wrap it in another InferenceServer"
            )
        super()._attach(server)
