"""MPTransport: actors in other processes, with a shared-memory fast path.

How a request travels (details in docs/processes.md):

* each client process registers with the server once and gets its own range
  of ``max_inflight`` slots in two shared-memory banks (requests, answers);
* the client copies its observation into its request slot and sends a
  13-byte datagram (slot id + submit time) on an abstract Unix socket;
* the server reads every waiting datagram per wake-up, hands the server loop
  per-slot views of the bank (stacked with one copy per key), writes the
  batch output into the answer slots with one ``index_copy_`` per key, and
  sends each client a 13-byte "done";
* requests that do not fit the bank's layout (other keys, shapes, dtypes,
  non-tensor data) are pickled instead, and answered the same way.

The layout is declared with ``request_example``/``response_example`` or
learned from the first request and the first batch output.
"""
from __future__ import annotations

import uuid

from concurrent.futures import Future
from typing import Any, Sequence

from .._td import TensorDictBase
from ..errors import ServerClosedError
from ..transport import InferenceTransport, ServerHandle, TransportCapabilities
from ._mp_client import MPClient
from ._shm import Layout, unlink_token

__all__ = ["MPTransport", "MPClient"]


class MPTransport(InferenceTransport):
    """Transport for actors living in other processes (any start method).

    Args:
        ctx: accepted for compatibility with torchrl's signature and ignored:
            clients work in processes started with ``spawn``, ``forkserver``
            or ``fork`` (plain or ``torch.multiprocessing``) alike.
        request_example: an example request (unbatched TensorDict); fixes the
            shared-memory request layout up front. Default: learned from the
            first request that is all dense CPU tensors.
        response_example: an example answer (one row, without the policy
            version). Model outputs may carry more keys; only these travel.
            Default: learned from the first batch output (then every key of
            the output travels, and an output with other keys is pickled).
        max_clients: most client processes registered at once (each client
            object registers once per process that uses it).
        max_inflight: slots per client, i.e. most requests one client process
            has in flight (``submit`` futures included). Backpressure bound.
        block_when_full: when a client has ``max_inflight`` requests in
            flight, ``True`` makes ``submit`` wait for a free slot (checking
            the server is alive); ``False`` raises QueueFullError at once.
        learn_layout: learn missing layouts from traffic (else pickle all
            requests/answers without a declared layout).
        spin_us: after answering, the server keeps polling its socket this
            many microseconds (yielding the CPU between polls) before it
            sleeps, so a request that follows soon needs no wake-up (~30 us
            per round trip on a VM). ``None``: 100 in a :class:`ProcessServer`
            (a process of its own), 0 where the server shares its process
            (and GIL) with other work such as a trainer.
        use_manager: accepted for torchrl compatibility and ignored: what a
            manager gives torchrl (clients made after start, in any process)
            rlserve's clients always do.
    """

    # answers are written into the bank batch-wise
    capabilities = TransportCapabilities(whole_batches=True, timed_drain=True, wakeable=True)

    def __init__(
        self,
        ctx=None,
        *,
        request_example=None,
        response_example=None,
        max_clients: int = 64,
        max_inflight: int = 4,
        block_when_full: bool = True,
        learn_layout: bool = True,
        spin_us: float | None = None,
        use_manager: bool = False,
    ):
        if max_clients < 1 or max_inflight < 1:
            raise ValueError("max_clients and max_inflight must be >= 1")
        self.token = uuid.uuid4().hex[:16]
        self.request_layout = self._layout(request_example, "request_example")
        self.response_layout = self._layout(response_example, "response_example")
        self.max_clients = int(max_clients)
        self.max_inflight = int(max_inflight)
        self.block_when_full = bool(block_when_full)
        self.learn_layout = bool(learn_layout)
        if spin_us is not None and spin_us < 0:
            raise ValueError(f"spin_us must be >= 0 or None, got {spin_us}")
        self.spin_us = spin_us
        #: the spin used when ``spin_us`` is None; a ProcessServer sets 100 in its own process
        self.default_spin_us = 0.0
        self._side = None  # server half, only in the serving process
        #: True once this process saw the transport's server shut down (clients made here then
        #: fail at once instead of waiting for a server to start); a new start clears it
        self.closed_here = False
        self._local_client = None  # submit() from the serving process goes through a client too

    @staticmethod
    def _layout(example, what):
        if example is None:
            return None
        layout = Layout.from_td(example)
        if layout is None:
            raise ValueError(f"{what} must be a TensorDict of dense CPU tensors, got {example!r}")
        return layout

    def _cfg(self) -> dict:
        return {"token": self.token, "block_when_full": self.block_when_full}

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_side"] = None
        d["_server"] = None
        d["_local_client"] = None
        return d

    def client(self) -> MPClient:
        """A picklable client; it registers with the server on first use in each process."""
        return MPClient(self._cfg(), self)

    # -- server side (the process running the InferenceServer) ----------------
    def bind(self, server: ServerHandle) -> None:
        super().bind(server)
        self.closed_here = False
        from ._mp_server import ServerSide

        if self._side is None or self._side.torn_down:
            self._side = ServerSide(self, server.policy_version_key)

    def _require_side(self):
        side = self._side
        if side is None:
            raise ServerClosedError("this MPTransport is not being served in this process")
        return side

    def submit(self, td: TensorDictBase) -> Future:
        """Submit from the server's own process (goes through a client, like any actor)."""
        c = self._local_client
        if c is None:
            c = self._local_client = self.client()
        return c.submit(td)

    def wait_for_work(self, timeout: float) -> None:
        side = self._side
        if side is None or side.torn_down:
            import time

            time.sleep(min(timeout, 0.05))
            return
        side.wait(timeout)

    def drain_timed(self, max_items: int) -> tuple[list, list, list[float]]:
        side = self._side
        if side is None:
            return [], [], []
        return side.drain(max_items)

    def drain(self, max_items: int) -> tuple[list, list]:
        ins, cbs, _ = self.drain_timed(max_items)
        return ins, cbs

    def resolve_batch(self, callbacks: Sequence, batch: TensorDictBase, policy_version: int) -> None:
        self._require_side().resolve_batch(list(callbacks), batch)

    def resolve(self, callback: Any, result: TensorDictBase) -> None:
        self._require_side().resolve_pickled(callback, result)

    def resolve_exception(self, callback: Any, exc: BaseException) -> None:
        self._require_side().resolve_exception(callback, exc)

    def wake(self) -> None:
        import socket

        from . import _wire as W

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(W.pack(W.WAKE, 0, 0.0), W.server_address(self.token))
        except OSError:
            pass

    def close(self) -> None:
        self.closed_here = True
        side = self._side
        if side is not None:
            side.closed = True  # the server thread tears down once it has failed what is queued
        self.wake()

    def usage(self) -> dict:
        """Registry figures (clients, free places, in flight, layouts), serving process only."""
        side = self._side
        return side.usage() if side is not None else {}

    def cleanup(self) -> list[str]:
        """Unlink every shared-memory segment of this transport (after a crashed server)."""
        return unlink_token(self.token)
