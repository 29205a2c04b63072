"""PolicyClientModule: a served policy as a ``tensordict.nn`` module (torchrl's class).

Wraps a client (or anything that makes one: a transport, a server) so that it
can stand wherever a TensorDict policy goes: ``env.rollout(policy=...)``, a
torchrl collector, a ``TensorDictSequential``. Each request carries this
module's interaction type (or, when it has none, the caller's).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from tensordict.nn import InteractionType, TensorDictModuleBase, set_interaction_type

from ._td import TensorDictBase
from .interaction import caller_code, code_of, stamp

__all__ = ["PolicyClientModule"]


def _client_of(client: Any) -> Callable:
    """A client from a client, or from what hands clients out: a transport, a server, a service
    (anything with ``client()``, ``start()`` and ``shutdown()``)."""
    from .transport import InferenceClient, InferenceTransport

    if isinstance(client, InferenceClient):
        return client
    if isinstance(client, InferenceTransport) or all(
            callable(getattr(client, name, None)) for name in ("client", "start", "shutdown")):
        return client.client()
    return client


class PolicyClientModule(TensorDictModuleBase):
    """A served policy as a TensorDict module: ``module(td)`` returns the server's answer.

    Args:
        client: an rlserve client, or a transport / server (its ``client()`` is
            used), or any callable from a TensorDict to a TensorDict.
        in_keys: the keys the policy reads (informative; the whole request travels).
        out_keys: the keys it writes.
        max_inflight: at most this many requests of this module in flight at
            once (``submit`` then blocks until one is answered); ``None``: no bound.
        interaction_type: run this module's requests under this interaction
            type (``"random"``, ``InteractionType.MODE``, ...); ``None``: the
            caller's own at each call.

    Picklable when its client is (an ``MPTransport``, ``ProcessServer``, Ray
    or Monarch client), so it can be handed to actor processes.
    """

    def __init__(
        self,
        client: Any,
        *,
        in_keys: Sequence | None = None,
        out_keys: Sequence | None = None,
        max_inflight: int | None = None,
        interaction_type: InteractionType | str | None = None,
    ):
        super().__init__()
        if max_inflight is not None and max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1 (got {max_inflight}); use None to disable the guard.")
        self.client = _client_of(client)
        self.in_keys = list(in_keys or [])
        self.out_keys = list(out_keys or [])
        self.max_inflight = max_inflight
        if interaction_type is not None and not isinstance(interaction_type, InteractionType):
            interaction_type = InteractionType(str(interaction_type).lower())
        self.interaction_type = interaction_type
        self._slots = threading.BoundedSemaphore(max_inflight) if max_inflight else None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slots"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._slots = threading.BoundedSemaphore(self.max_inflight) if self.max_inflight else None

    def _stamped(self, td: TensorDictBase) -> TensorDictBase:
        code = code_of(self.interaction_type) if self.interaction_type is not None else caller_code()
        return td if code is None else stamp(td, code)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """The answer to ``tensordict`` (a new TensorDict; the input is left as it is)."""
        client = self.client
        if not hasattr(client, "submit"):  # a plain callable: run it here, under the interaction type
            if self.interaction_type is None:
                return client(tensordict)
            with set_interaction_type(self.interaction_type):
                return client(tensordict)
        slots = self._slots
        if slots is not None:
            slots.acquire()
        try:
            return client(self._stamped(tensordict))
        finally:
            if slots is not None:
                slots.release()

    def submit(self, tensordict: TensorDictBase) -> Future:
        """Submit ``tensordict``; returns a Future of the answer (blocks while ``max_inflight`` are pending)."""
        client = self.client
        if not hasattr(client, "submit"):
            fut: Future = Future()
            try:
                fut.set_result(self.forward(tensordict))
            except Exception as e:
                fut.set_exception(e)
            return fut
        slots = self._slots
        if slots is not None:
            slots.acquire()
        try:
            fut = client.submit(self._stamped(tensordict))
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        if slots is not None:
            fut.add_done_callback(lambda _f: slots.release())
        return fut

    def extra_repr(self) -> str:
        return f"client={type(self.client).__name__}, max_inflight={self.max_inflight}, " \
               f"interaction_type={self.interaction_type}"

