"""Pieces shared by the transports whose callers live in other processes (Ray, Monarch).

* a wire codec: a flat TensorDict of CPU tensors travels as numpy arrays,
  which pickle about 10x faster than torch tensors (no ``torch.save`` per
  leaf); anything else travels as the TensorDict itself;
* replies are ``("ok", payload)`` or ``("err", exception)`` tuples, so an
  error reaches the one caller that caused it with its own type, and the
  remote engine never sees an exception it might treat as an actor failure;
* :class:`EventLoopQueueTransport`: the in-actor queue between an actor's
  asyncio endpoint (one coroutine per pending request) and the
  :class:`~rlserve.InferenceServer` thread, answering a whole batch with a
  single ``call_soon_threadsafe``.
"""
from __future__ import annotations

import logging
import pickle

import numpy as np
import torch

from .._td import TensorDict, TensorDictBase, flat_leaves, new_td
from ..errors import RequestError
from .threading import ThreadingTransport

__all__ = ["encode_td", "decode_td", "encode_rows", "reply_error", "unwrap_reply", "EventLoopQueueTransport"]

log = logging.getLogger("rlserve")

_FLAT = "rlserve.flat"  # marker of the numpy wire format


def encode_td(td) -> object:
    """The cheapest picklable form of one request (or answer)."""
    d = flat_leaves(td)
    if d is not None:
        arrays = []
        for v in d.values():
            if v.device.type != "cpu" or v.requires_grad:
                return td
            try:
                arrays.append(v.numpy())
            except (TypeError, RuntimeError):  # e.g. bfloat16 has no numpy dtype
                return td
        return (_FLAT, tuple(td.batch_size), tuple(d), tuple(arrays))
    if isinstance(td, TensorDictBase):
        return td
    raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")


def decode_td(payload) -> TensorDictBase:
    """Inverse of :func:`encode_td`; raises RequestError for anything else."""
    if type(payload) is tuple and len(payload) == 4 and payload[0] == _FLAT:
        _, bs, keys, arrays = payload
        src = {}
        for k, a in zip(keys, arrays):
            if not isinstance(a, np.ndarray):
                raise RequestError(f"malformed request: leaf {k!r} is a {type(a).__name__}")
            if not a.flags.writeable:  # zero-copy buffers from the engine are read-only
                a = a.copy()
            src[k] = torch.from_numpy(a)
        try:
            return TensorDict(src, batch_size=bs)  # checked constructor: payloads are untrusted
        except Exception as e:
            raise RequestError(f"malformed request: {e}") from None
    if isinstance(payload, TensorDictBase):
        return payload
    raise RequestError(f"request must be a TensorDict, got {type(payload).__name__}")


def encode_rows(out, n: int, version_key, version: int) -> list:
    """Split a batched model output into ``n`` encoded replies, stamping the version."""
    if not isinstance(out, TensorDictBase):
        raise TypeError(f"the model returned {type(out).__name__}, expected a TensorDict")
    if out.batch_dims == 0 or out.batch_size[0] != n:
        raise RuntimeError(
            f"the model returned batch_size={list(out.batch_size)} for a batch of {n} requests; "
            "it must keep the leading batch dimension"
        )
    d = flat_leaves(out)
    cols = None
    if d is not None:
        try:
            cols = [v.detach().numpy() for v in d.values()] if all(v.device.type == "cpu" for v in d.values()) else None
        except (TypeError, RuntimeError):
            cols = None
    if cols is None:  # general path: rows as TensorDicts
        if version_key is not None:
            out.set(version_key, torch.full(out.batch_size, version, dtype=torch.int64))
        return [("ok", row) for row in out.unbind(0)]
    keys = tuple(d)
    if version_key is not None:
        keys = keys + (version_key,)
        cols.append(np.full(tuple(out.batch_size), version, dtype=np.int64))
    row_bs = tuple(out.batch_size[1:])
    return [("ok", (_FLAT, row_bs, keys, tuple(c[i, ...] for c in cols))) for i in range(n)]


def reply_error(exc: BaseException) -> tuple:
    """An error reply that is sure to pickle (the model's own exception may not)."""
    try:
        pickle.dumps(exc)
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return ("err", exc)


def unwrap_reply(reply) -> TensorDictBase:
    """Turn a reply tuple into the answer, or raise the error it carries."""
    kind, value = reply
    if kind == "ok":
        return decode_td(value)
    raise value


def _deliver(futs, replies) -> None:
    for f, r in zip(futs, replies):
        if not f.done():  # a caller cancelled (e.g. its own timeout): nobody to answer
            f.set_result(r)


class EventLoopQueueTransport(ThreadingTransport):
    """In-actor queue: callbacks are ``(loop, asyncio.Future)`` pairs resolved with reply tuples.

    The endpoint coroutine puts ``(request, (loop, future))`` and awaits the
    future; the server thread answers a whole batch with one
    ``call_soon_threadsafe`` per event loop.
    """

    wants_rows = False  # we encode rows straight from the batch output

    def resolve_batch(self, callbacks, batch_out, rows) -> None:
        server = self._server
        key = server.policy_version_key if server is not None else None
        version = server.policy_version if server is not None else 0
        try:
            replies = encode_rows(batch_out, len(callbacks), key, version)
        except Exception as e:
            for cb in callbacks:
                self.resolve_exception(cb, e)
            return
        loop0 = callbacks[0][0]
        if all(cb[0] is loop0 for cb in callbacks):
            self._post(loop0, [cb[1] for cb in callbacks], replies)
        else:
            for cb, r in zip(callbacks, replies):
                self._post(cb[0], [cb[1]], [r])

    def resolve(self, callback, result) -> None:
        key = self._server.policy_version_key if self._server is not None else None
        ver = self._server.policy_version if self._server is not None else 0
        self._post(callback[0], [callback[1]], encode_rows(result.unsqueeze(0), 1, key, ver))

    def resolve_exception(self, callback, exc: BaseException) -> None:
        self._post(callback[0], [callback[1]], [reply_error(exc)])

    @staticmethod
    def _post(loop, futs, replies) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, futs, replies)
        except RuntimeError:  # the actor's loop is closed: the actor is going away
            log.debug("rlserve: dropped %d answers for a closed event loop", len(futs))
