"""Actor half of MPTransport: the client, usable from any process.

A client pickles as the transport's token and settings only. In each process
that uses it (found by pid, so a ``fork`` copy re-registers too) it opens its
own socket, registers with the server, and gets its own range of slots. The
blocking ``client(td)`` path: match the layout, copy each leaf into the slot,
send 13 bytes, block on the socket, clone the answer out of the response
slot. ``submit`` returns a Future that a reader thread resolves.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from concurrent.futures import Future, InvalidStateError

import torch

from .._td import TensorDictBase
from ..errors import QueueFullError, RequestError, ServerClosedError, ServerDeadError
from ..transport import LIVENESS_PERIOD_S, InferenceClient, wait_future
from . import _wire as W
from ._shm import Bank, unlink_segment

_perf = time.perf_counter
_REGISTER_TIMEOUT_S = 60.0


def _set_timeouts(sock, seconds: float) -> None:
    # Kernel-side timeouts keep the socket "blocking" for Python: one syscall
    # per recv instead of poll + recv.
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class MPClient(InferenceClient):
    """Client of an :class:`~rlserve.MPTransport`; picklable, works in any process."""

    def __init__(self, cfg: dict, transport=None):
        self._transport = transport  # only set in the creating process; never pickled
        self._cfg = cfg
        self._token = cfg["token"]
        self._srv = W.server_address(self._token)
        self._pid = None
        self._sock = None
        self._probe = None
        self._lock = threading.RLock()   # one thread reads the socket at a time
        self._cv = threading.Condition(threading.Lock())  # slot freed / answer in
        self._reset_state()

    def __reduce__(self):
        return (MPClient, (self._cfg,))

    def _reset_state(self) -> None:
        self._free: list = []
        self._done: dict = {}
        self._futures: dict = {}
        self._abandoned: set = set()
        self._req_bank = self._resp_bank = None
        self._req_views = self._resp_views = None
        self._closed_seen = None  # None, "closed" or "dead"
        self._registered = False
        self._contacted = False  # a message reached the server once: losing it now means it died
        self._reader = None
        self._buf = bytearray(W.HLEN + W.INLINE_MAX + 64)
        self._view = memoryview(self._buf)

    # -- connection --------------------------------------------------------------
    def _connect(self) -> None:
        """Open this process's socket and register with the server."""
        old = self._sock
        if old is not None and self._pid == os.getpid():
            self.close()
        elif old is not None:
            try:
                old.detach()  # a fork copy: the parent still uses the descriptor
            except OSError:
                pass
        self._reset_state()
        self._lock = threading.RLock()
        self._cv = threading.Condition(threading.Lock())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(W.client_address(self._token))
        _set_timeouts(sock, LIVENESS_PERIOD_S)
        self._sock = sock
        self._pid = os.getpid()
        self._send(W.pack(W.REGISTER, 0, 0.0, W.encode(os.getpid(), self._token)))
        self._contacted = True
        deadline = time.monotonic() + _REGISTER_TIMEOUT_S
        while not self._registered:
            self._pump_one(deadline)

    def close(self) -> None:
        """Give this process's slots back to the server and close the socket."""
        sock = self._sock
        if sock is None or self._pid != os.getpid():
            return
        self._sock = None
        if self._registered and self._closed_seen is None:
            try:
                sock.sendto(W.pack(W.BYE, self._base, 0.0), self._srv)
            except OSError:
                pass
        sock.close()
        self._registered = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- liveness ------------------------------------------------------------------
    def _gone(self) -> Exception:
        """The error for a server we can no longer reach."""
        if self._closed_seen == "closed":
            return ServerClosedError("the inference server shut down before answering")
        if self._closed_seen == "dead" or self._registered or self._contacted:
            self._closed_seen = "dead"
            for b in (self._req_bank, self._resp_bank):  # a dead server cannot unlink them
                if b is not None:
                    unlink_segment(b.name)
            return ServerDeadError("the inference server is gone (its process died or its socket closed)")
        return ServerClosedError(
            "no InferenceServer is serving this MPTransport (not started yet, shut down, or its process died)")

    def check_alive(self) -> None:
        """Raise ServerClosedError/ServerDeadError unless the server's socket still exists.

        ``connect`` on a datagram socket only looks the address up: it puts
        nothing in the server's (short) queue, however often it is called.
        """
        if self._closed_seen is not None:
            raise self._gone()
        probe = self._probe
        if probe is None or probe[0] != os.getpid():
            probe = self._probe = (os.getpid(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        try:
            probe[1].connect(self._srv)
        except (ConnectionRefusedError, FileNotFoundError):
            raise self._gone() from None

    def _send(self, msg) -> None:
        while True:
            try:
                self._sock.sendto(msg, self._srv)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                raise self._gone() from None
            except (BlockingIOError, TimeoutError):
                self._contacted = True  # a live server whose queue is full: it drains it soon
                self.check_alive()

    # -- receiving ---------------------------------------------------------------------
    def _pump_one(self, deadline) -> bool:
        """Read and dispatch one message (False if none came within the liveness period)."""
        try:
            n = self._sock.recv_into(self._buf)
        except (BlockingIOError, TimeoutError):
            self.check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no answer from the inference server in time") from None
            return False
        self._dispatch(n)
        return True

    def _dispatch(self, n: int) -> None:
        kind, slot, _ = W.HEADER.unpack_from(self._buf)
        if kind == W.ANS_FAST:
            views = self._resp_views[slot - self._base]
            res = self._resp_bank.layout.build(
                [v.clone() for v in views],
                None if self._vkey is None else {self._vkey: self._resp_bank.version[slot].clone()},
            )
            self._deliver(slot, res, None)
        elif kind == W.ANS_PICKLE:
            self._deliver(slot, W.decode(self._view[W.HLEN:n]), None)
        elif kind == W.ERR:
            self._deliver(slot, None, W.decode(self._view[W.HLEN:n]))
        elif kind == W.LAYOUT:
            which, desc = W.decode(self._view[W.HLEN:n])
            self._attach(which, desc)
        elif kind == W.REGISTERED:
            cid, base, per, req, resp, vkey = W.decode(self._view[W.HLEN:n])
            self._cid, self._base, self._per, self._vkey = cid, base, per, vkey
            self._free = list(range(base + per - 1, base - 1, -1))
            if req is not None:
                self._attach("req", req)
            if resp is not None:
                self._attach("resp", resp)
            self._registered = True
        elif kind == W.REFUSED:
            raise W.decode(self._view[W.HLEN:n])
        elif kind == W.CLOSED:
            self._closed_seen = "dead" if slot else "closed"
            if not self._registered:
                raise self._gone()

    def _attach(self, which: str, desc) -> None:
        name, layout, slots = desc
        bank = Bank(name, layout, slots, create=False)
        views = [bank.row_views(s) for s in range(self._base, self._base + self._per)]
        if which == "req":
            self._req_bank, self._req_views = bank, views
        else:
            self._resp_bank, self._resp_views = bank, views

    def _deliver(self, slot, res, exc) -> None:
        with self._cv:
            fut = self._futures.pop(slot, None)
        if fut is not None:
            try:
                if exc is None:
                    fut.set_result(res)
                else:
                    fut.set_exception(exc)
            except InvalidStateError:  # cancelled by its caller
                pass
        elif slot in self._abandoned:
            self._abandoned.discard(slot)
        else:
            self._done[slot] = (res, exc)
        with self._cv:
            self._free.append(slot)
            self._cv.notify_all()

    # -- requests ----------------------------------------------------------------------
    def _take_slot(self, timeout) -> int:
        free = self._free
        if free:
            return free.pop()
        if not self._cfg["block_when_full"]:
            raise QueueFullError(f"{self._per} requests of this client already in flight (max_inflight)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._reader is None:
                with self._lock:  # nobody else reads: read answers ourselves
                    self._pump_one(None)
            else:
                with self._cv:
                    self._cv.wait(LIVENESS_PERIOD_S)
                self.check_alive()
            with self._cv:
                if free:
                    return free.pop()
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueFullError(f"no free slot within {timeout} s: {self._per} requests in flight")

    def _post(self, td, slot: int) -> None:
        bank = self._req_bank
        if bank is not None:
            vals = bank.layout.match(td)
            if vals is not None:
                for dst, v in zip(self._req_views[slot - self._base], vals):
                    dst.copy_(v)
                self._send(W.HEADER.pack(W.REQ_FAST, slot, _perf()))
                return
        self._send(W.pack(W.REQ_PICKLE, slot, _perf(), W.encode(td, self._token)))

    def _start(self, td, timeout, fut=None):
        if not isinstance(td, TensorDictBase):
            raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
        if self._pid != os.getpid():
            self._connect()
        if self._closed_seen is not None:
            raise self._gone()
        slot = self._take_slot(timeout)
        if fut is not None:
            with self._cv:  # registered before sending: the answer may come at once
                self._futures[slot] = fut
        try:
            self._post(td, slot)
        except BaseException:
            with self._cv:
                self._futures.pop(slot, None)
                self._free.append(slot)
            raise
        return slot

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        """Submit ``td`` and wait for its answer (at most ``timeout`` seconds)."""
        if self._futures or self._reader is not None:
            return wait_future(self.submit(td), timeout, self.check_alive)
        slot = self._start(td, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._done
        try:
            while slot not in done:
                with self._lock:
                    if slot not in done:
                        self._pump_one(deadline)
        except BaseException:
            if slot not in done and self._closed_seen is None:
                self._abandoned.add(slot)  # its answer will free the slot
            raise
        res, exc = done.pop(slot)
        if exc is not None:
            raise exc
        return res

    def submit(self, td: TensorDictBase) -> Future:
        """Submit ``td``; returns a Future resolved by this process's reader thread."""
        fut = Future()
        self._start(td, None, fut)
        with self._cv:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_loop, name="rlserve-mp-reader", daemon=True)
                self._reader.start()
        return fut

    def _read_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    with self._cv:
                        if not self._futures:
                            self._reader = None
                            return
                    self._pump_one(None)
        except BaseException as e:  # server gone: fail every pending future
            with self._cv:
                futs, self._futures = self._futures, {}
                self._reader = None
            for fut in futs.values():
                try:
                    fut.set_exception(e)
                except InvalidStateError:
                    pass
