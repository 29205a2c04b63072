"""torchrl's slot transports, as thin front-ends over rlserve's own machinery.

* :class:`SlotTransport`: in-process, one slot per client, at most one
  request in flight per client: a :class:`ThreadingTransport` whose clients
  are counted;
* :class:`SharedMemoryTransport` and :class:`ProcessSlotTransport`: processes
  on this machine, fixed request and response layouts: an
  :class:`MPTransport` with those layouts declared (its shared-memory slot
  banks; there is no second slot-bank implementation).

Their constructors, limits and messages are torchrl 0.14's.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import torch

from .._td import TensorDictBase
from .mp import MPClient, MPTransport
from .threading import ThreadingClient, ThreadingTransport

__all__ = ["SlotTransport", "SharedMemoryTransport", "ProcessSlotTransport"]


class SlotTransport(ThreadingTransport):
    """In-process transport with ``num_slots`` slot-bound clients, one request in flight each.

    Args:
        num_slots: how many clients ``client()`` hands out.
        preallocate: accepted for torchrl compatibility (rlserve allocates nothing per slot).
    """

    def __init__(self, num_slots: int, *, preallocate: bool = False):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {num_slots}.")
        super().__init__()
        self.num_slots = num_slots
        self.preallocate = preallocate
        self._issued = 0
        self._issue_lock = threading.Lock()

    def submit(self, td: TensorDictBase) -> Future:
        raise NotImplementedError("SlotTransport does not support submit(). Use client() to obtain a slot-bound callable.")

    def client(self) -> SlotClient:
        with self._issue_lock:
            self._issued += 1
            if self._issued > self.num_slots:
                raise RuntimeError(
                    f"SlotTransport has {self.num_slots} slots but client() was called {self._issued} times. "
                    "Create a SlotTransport with more slots.")
            return SlotClient(self, self._issued - 1)


class SlotClient(ThreadingClient):
    """A client bound to one slot of a :class:`SlotTransport`: one request in flight at a time."""

    def __init__(self, transport: SlotTransport, slot: int):
        super().__init__(transport)
        self.slot = slot
        self._busy = threading.Lock()

    def _claim(self) -> None:
        if not self._busy.acquire(False):
            raise RuntimeError(f"Inference slot {self.slot} already has an inflight request.")

    def submit(self, td: TensorDictBase) -> Future:
        self._claim()
        try:
            fut = super().submit(td)
        except BaseException:
            self._busy.release()
            raise
        fut.add_done_callback(lambda _f: self._busy.release())
        return fut

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        self._claim()
        try:
            return super().__call__(td, timeout)
        finally:
            self._busy.release()


def _leaves(td: TensorDictBase, prefix: tuple = ()) -> list:
    """``[(key, value)]`` of every leaf, non-tensor data included (as leaves)."""
    from tensordict.tensorclass import is_non_tensor

    out = []
    for k, v in td.items():
        key = prefix + (k,)
        if isinstance(v, TensorDictBase) and not is_non_tensor(v):
            out += _leaves(v, key)
        else:
            out.append((key[0] if len(key) == 1 else key, v))
    return out


def _check_spec(spec: Any, what: str, cls: str) -> None:
    """torchrl's checks of a slot layout."""
    if not isinstance(spec, TensorDictBase):
        raise TypeError(f"{what} must be a TensorDict, got {type(spec).__name__}.")
    leaves = _leaves(spec)
    for k, v in leaves:
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"{cls} specs only support tensor leaves; {what} has a {type(v).__name__} at key {k!r}. "
                "Encode small metadata as tensors or use MPTransport.")
    if not leaves:
        raise ValueError(f"{what} must contain at least one tensor leaf.")
    for k, v in leaves:
        if v.device.type != "cpu":
            raise ValueError(f"{cls} slots live in CPU shared memory; {what} has a {v.device} tensor at key {k!r}.")


class SharedMemoryTransport(MPTransport):
    """Processes on this machine with fixed layouts: an :class:`MPTransport` with both declared.

    Args:
        request_spec: one (unbatched) request; every request must match it.
        response_spec: one answer row; only its keys (and the version stamp) travel back.
        num_slots: requests one client may have in flight (any number of clients).
        ctx: accepted for torchrl compatibility (clients work in processes started any way).
        copy_result: accepted for torchrl compatibility: answers are always copies.
    """

    _cls_name = "SharedMemoryTransport"

    @staticmethod
    def _check_num_slots(num_slots: Any) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {num_slots}.")

    def __init__(self, request_spec: TensorDictBase, response_spec: TensorDictBase, *, num_slots: int,
                 ctx: Any = None, copy_result: bool = True):
        self._check_num_slots(num_slots)
        _check_spec(request_spec, "request_spec", self._cls_name)
        _check_spec(response_spec, "response_spec", self._cls_name)
        # num_slots bounds what one client has in flight; any number of client processes share the server
        super().__init__(ctx, request_example=request_spec, response_example=response_spec,
                         max_clients=max(64, num_slots), max_inflight=num_slots)
        self.num_slots = num_slots
        self.copy_result = copy_result
        self.request_spec = request_spec
        self.response_spec = response_spec


class ProcessSlotTransport(SharedMemoryTransport):
    """Like :class:`SharedMemoryTransport`, with one fixed slot per ``client()`` (at most ``num_slots``)."""

    _cls_name = "ProcessSlotTransport"

    def __init__(self, request_spec: TensorDictBase, response_spec: TensorDictBase, *, num_slots: int,
                 ctx: Any = None, copy_result: bool = True):
        self._check_num_slots(num_slots)
        _check_spec(request_spec, "request_spec", self._cls_name)
        _check_spec(response_spec, "response_spec", self._cls_name)
        MPTransport.__init__(self, ctx, request_example=request_spec, response_example=response_spec,
                             max_clients=num_slots, max_inflight=1)  # one fixed slot per client
        self.num_slots = num_slots
        self.copy_result = copy_result
        self.request_spec = request_spec
        self.response_spec = response_spec
        self._issued = 0

    @staticmethod
    def _check_num_slots(num_slots: Any) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int):
            raise TypeError("num_slots must be an integer.")
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}.")

    def __getstate__(self):
        d = super().__getstate__()
        d["_issued"] = 0
        return d

    def submit(self, td: TensorDictBase) -> Future:
        raise NotImplementedError(
            "ProcessSlotTransport does not support submit(). Call client() to obtain a fixed-slot client.")

    def client(self) -> MPClient:
        self._issued += 1
        if self._issued > self.num_slots:
            raise RuntimeError(
                f"ProcessSlotTransport has {self.num_slots} slots but client() was called {self._issued} times.")
        return super().client()
