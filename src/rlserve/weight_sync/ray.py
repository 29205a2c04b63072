"""RayWeightSyncScheme: a trainer (driver or Ray actor) pushes weights through the object store.

The trainer ``ray.put``s the weights and registers the reference with a tiny
async *mailbox* actor, which numbers the versions. The server side keeps one
long-poll to the mailbox in flight; between batches ``receive()`` only looks
whether it has landed (no blocking call), then fetches the newest weights
from the object store and copies them into the live model in place -- on
the server thread, between two forwards, so no batch sees torn weights and
each answer's version is the version of the weights that produced it.
Intermediate versions a slow server never saw are skipped: newest wins.
"""
from __future__ import annotations

import asyncio
import logging
import threading

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

    async def mark_taken(self, version: int) -> None:
        self.taken = max(self.taken, version)
        async with self._c():
            self._c().notify_all()

    async def wait_taken(self, version: int, wait_s: float) -> bool:
        c = self._c()
        async with c:
            try:
                await asyncio.wait_for(c.wait_for(lambda: self.taken >= version), wait_s)
            except asyncio.TimeoutError:
                return False
        return True


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
    answered with them (or newer).

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
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"_mailbox": self._mailbox}  # per-process state is rebuilt on the other side

    def __setstate__(self, state):
        self._mailbox = state["_mailbox"]
        self._reset_local()

    # -- trainer side -------------------------------------------------------------------
    def send(self, model=None, weights=None, version: int | None = None, wait: bool = False,
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
        if wait and not ray.get(self._mailbox.wait_taken.remote(v, timeout), timeout=timeout + 5):
            raise TimeoutError(f"no server took weights version {v} within {timeout} s")
        return v

    # -- server side --------------------------------------------------------------------
    def init_on_receiver(self, model=None, **kwargs) -> None:
        self._receiver_model = model
        self._issue_poll()

    def _issue_poll(self) -> None:
        fut = self._mailbox.newer_than.remote(self._seen, _POLL_S).future()
        self._poll = fut
        fut.add_done_callback(self._landed)

    def _landed(self, fut) -> None:
        """The new version reached this server: the next batch applies it before it runs."""
        try:
            res = fut.result()
        except Exception:
            return
        if res is not None:
            self._mailbox.mark_taken.remote(res[0])

    def receive(self) -> int | None:
        """Apply the newest published weights if they have arrived; never blocks on the trainer."""
        fut = self._poll
        if fut is None or not fut.done():
            return None
        try:
            res = fut.result()
        except Exception as e:  # mailbox gone (its owner exited): stop listening
            log.warning("rlserve: RayWeightSyncScheme mailbox unreachable, weight updates stop: %r", e)
            self._poll = None
            return None
        if res is None:  # long-poll expired with nothing new
            self._issue_poll()
            return None
        version, box = res
        try:
            ray = _ray()
            weights = ray.get(box[0], timeout=30)
            copy_weights_(self._receiver_model, prepare_weights(self._receiver_model, weights))
        except Exception as e:  # never kill the serving loop over a bad update
            log.error("rlserve: could not apply weights version %s: %r", version, e)
            self._seen = version
            self._issue_poll()
            return None
        self._seen = version
        self._issue_poll()
        return version

    def _close_receiver(self) -> None:
        self._poll = None

    @property
    def published_version(self) -> int:
        """Newest version the mailbox holds (one Ray call)."""
        return _ray().get(self._mailbox.current.remote(), timeout=30)
