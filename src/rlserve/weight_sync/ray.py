"""RayWeightSyncScheme: a trainer (driver or Ray actor) pushes weights through the object store.

The trainer ``ray.put``s the weights and registers the reference with a tiny
async *mailbox* actor, which numbers the versions. The server side keeps one
long-poll to the mailbox in flight (renewed when it expires, busy or idle);
when it lands, a helper thread fetches the weights from the object store,
checks them against the model and tells the mailbox whether the server took
or rejected them. Between batches ``receive()`` only copies weights already
fetched into the live model in place (no blocking call) -- on
the server thread, between two forwards, so no batch sees torn weights and
each answer's version is the version of the weights that produced it.
Intermediate versions a slow server never saw are skipped: newest wins.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import torch

from .base import WeightSyncScheme, copy_weights_, prepare_weights

__all__ = ["RayWeightSyncScheme"]

log = logging.getLogger("rlserve")
_POLL_S = 10.0  # how long one mailbox long-poll waits before it is renewed


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("RayWeightSyncScheme needs Ray: pip install 'rlserve[ray]'") from None
    return ray


class _MailboxImpl:
    """Holds the newest (version, [ObjectRef]) and the newest version a server has taken."""

    def __init__(self):
        self.version = 0
        self.box = None
        self.taken = 0
        self.rejected = {}  # version -> why the server refused it
        self._cond = None

    def _c(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def publish(self, box, version=None) -> int:
        if version is None:
            version = self.version + 1
        elif version <= self.version:
            raise ValueError(f"version {version} is not newer than the published version {self.version}")
        self.version, self.box = int(version), box
        async with self._c():
            self._c().notify_all()
        return self.version

    async def newer_than(self, seen: int, wait_s: float):
        c = self._c()
        async with c:
            try:
                await asyncio.wait_for(c.wait_for(lambda: self.version > seen), wait_s)
            except asyncio.TimeoutError:
                return None
        return self.version, self.box

    async def current(self) -> int:
        return self.version

    async def mark_taken(self, version: int, error: str | None = None) -> None:
        if error is None:
            self.taken = max(self.taken, version)
        else:
            self.rejected[version] = error
            while len(self.rejected) > 64:  # bounded: only recent senders wait on these
                self.rejected.pop(min(self.rejected))
        async with self._c():
            self._c().notify_all()

    async def wait_taken(self, version: int, wait_s: float):
        """True once a server holds ``version`` (or newer), the reason if it refused it, False on timeout."""
        c = self._c()
        async with c:
            try:
                await asyncio.wait_for(
                    c.wait_for(lambda: self.taken >= version or version in self.rejected), wait_s)
            except asyncio.TimeoutError:
                return False
        if self.taken >= version:
            return True
        return self.rejected[version]


class RayWeightSyncScheme(WeightSyncScheme):
    """Weights from a trainer to an InferenceServer through Ray's object store.

    Create it where Ray is initialised (it starts a small mailbox actor),
    give it to the server (``InferenceServer(..., weight_sync=scheme)`` or
    ``RayTransport(factory, server_kwargs={"weight_sync": scheme})``) and to
    the trainer; it pickles into Ray actors and tasks.

    Trainer side: ``init_on_sender(model=...)`` (optional; lets ``send``
    check weights before they travel), then ``send(model=...)`` or
    ``send(weights=state_dict)``. ``send(..., wait=True)`` returns only once
    the server process holds those weights; the server applies them before
    its next batch, so every request submitted after ``send`` returns is
    answered with them (or newer). Weights the server refuses (e.g. shapes
    that do not match its model) make ``send(..., wait=True)`` raise ValueError.

    Args:
        actor_options: ``.options(...)`` of the mailbox actor.
    """

    def __init__(self, actor_options: dict | None = None):
        ray = _ray()
        opts = {"num_cpus": 0, "max_concurrency": 1000}
        opts.update(actor_options or {})
        self._mailbox = ray.remote(_MailboxImpl).options(**opts).remote()
        self._reset_local()

    def _reset_local(self) -> None:
        self._sender_model = None
        self._receiver_model = None
        self._seen = 0
        self._poll = None
        self._ready = None  # (version, checked weights) fetched, not yet applied
        self._closed = False
        # Re-entrant: add_done_callback runs _landed at once, under the lock, when the poll is done.
        self._lock = threading.RLock()

    def __getstate__(self):
        return {"_mailbox": self._mailbox}  # per-process state is rebuilt on the other side

    def __setstate__(self, state):
        self._mailbox = state["_mailbox"]
        self._reset_local()

    # -- trainer side -------------------------------------------------------------------
    def send(self, model: Any = None, weights: Any = None, version: int | None = None, wait: bool = False,
             timeout: float = 60.0) -> int:
        """Publish new weights; returns their version (``wait``: until a server has taken them)."""
        ray = _ray()
        if weights is None:
            model = model if model is not None else self._sender_model
            if model is None:
                raise ValueError("send() needs model= or weights= (or init_on_sender(model=...) first)")
            weights = model
        ref_model = self._sender_model if self._sender_model is not None else (
            model if isinstance(model, torch.nn.Module) else None)
        if ref_model is not None:
            weights = prepare_weights(ref_model, weights)  # bad weights fail here, on the sender
        elif isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        flat = {k: v.detach().to("cpu", copy=True) for k, v in dict(weights).items()}
        ref = ray.put(flat)
        v = ray.get(self._mailbox.publish.remote([ref], version), timeout=timeout)
        if wait:
            ok = ray.get(self._mailbox.wait_taken.remote(v, timeout), timeout=timeout + 5)
            if ok is False:
                raise TimeoutError(f"no server took weights version {v} within {timeout} s")
            if ok is not True:
                raise ValueError(f"the server rejected weights version {v}: {ok}")
        return v

    # -- server side --------------------------------------------------------------------
    # A landed poll hands the fetch to a short-lived thread (a blocking ray.get must not run
    # in Ray's future callback); that thread checks the weights against the model, tells the
    # mailbox taken/rejected, keeps them ready for receive() and re-issues the poll.
    def init_on_receiver(self, model: Any = None, **kwargs: Any) -> None:
        self._receiver_model = model
        self._ready = None
        self._closed = False
        with self._lock:
            self._issue_poll()

    def _issue_poll(self) -> None:
        """Start the next long-poll (caller holds ``self._lock``)."""
        if self._closed:
            return
        fut = self._mailbox.newer_than.remote(self._seen, _POLL_S).future()
        self._poll = fut
        fut.add_done_callback(self._landed)

    def _landed(self, fut) -> None:
        try:
            res = fut.result()
        except Exception as e:  # mailbox gone (its owner exited): stop listening
            if not self._closed:
                log.warning("rlserve: RayWeightSyncScheme mailbox unreachable, weight updates stop: %r", e)
            return
        if res is None:  # long-poll expired with nothing new: renew it even if no batch runs
            with self._lock:
                if fut is self._poll:
                    self._issue_poll()
            return
        threading.Thread(target=self._fetch, args=(fut, res), name="rlserve-weight-fetch",
                         daemon=True).start()

    def _fetch(self, fut, res) -> None:
        version, box = res
        error = None
        try:
            weights = _ray().get(box[0], timeout=30)
            prepared = prepare_weights(self._receiver_model, weights)
        except Exception as e:  # never kill the serving loop over a bad update
            log.error("rlserve: could not take weights version %s: %r", version, e)
            error = f"{type(e).__name__}: {e}"
        with self._lock:
            if self._closed or fut is not self._poll:
                return
            if error is None:
                self._ready = (version, prepared)
            self._seen = version
            self._issue_poll()
        try:
            self._mailbox.mark_taken.remote(version, error)
        except Exception:  # mailbox gone: the sender is gone too
            pass

    def receive(self) -> int | None:
        """Apply the newest weights this process has fetched; never blocks on the trainer."""
        if self._ready is None:
            return None
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None:
            return None
        version, weights = ready
        try:
            copy_weights_(self._receiver_model, weights)
        except Exception as e:  # never kill the serving loop over a bad update
            log.error("rlserve: could not apply weights version %s: %r", version, e)
            return None
        return version

    def close_receiver(self) -> None:
        with self._lock:
            self._closed = True
            self._poll = None
            self._ready = None

    @property
    def published_version(self) -> int:
        """Newest version the mailbox holds (one Ray call)."""
        return _ray().get(self._mailbox.current.remote(), timeout=30)
