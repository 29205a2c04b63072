"""Actor half of MPTransport: the client, usable from any process.

A client pickles as the transport's token and settings only. In each process
that uses it (found by pid, so a ``fork`` copy re-registers too) it opens its
own socket, registers with the server, and gets its own range of slots. The
blocking ``client(td)`` path: match the layout, copy each leaf into the slot,
send 13 bytes, block on the socket, clone the answer out of the response
slot. ``submit`` returns a Future that a reader thread resolves.

State is committed only once the server has accepted the registration, so a
failed attempt (server not started, refused, gone) leaves the client ready to
try again on its next call; so does ``close()``.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError


from .._td import TensorDictBase
from ..errors import QueueFullError, RequestError, ServerClosedError, ServerDeadError
from ..transport import LIVENESS_PERIOD_S, InferenceClient, wait_future
from . import _wire as W
from ._shm import Bank, unlink_segment

_perf = time.perf_counter
_REGISTER_TIMEOUT_S = 60.0
_LIVE_CLIENTS: "weakref.WeakSet[MPClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A fork child must not keep its parent's client sockets open: answers
    # meant for the parent would queue here, and the parent's address would
    # outlive it. The child re-registers on its next call.
    for c in list(_LIVE_CLIENTS):
        c._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self._pid = None  # the process whose registration is current (None: register on next use)
        self._sock = None
        self._probe = None
        self._new_locks()
        self._reset_state()
        _LIVE_CLIENTS.add(self)

    def __reduce__(self):
        return (MPClient, (self._cfg,))

    def _new_locks(self) -> None:
        self._lock = threading.RLock()   # one thread reads the socket at a time
        self._cv = threading.Condition(threading.Lock())  # slot freed / answer in
        self._conn_lock = threading.Lock()  # one registration at a time

    def _reset_state(self) -> None:
        self._free: list = []
        self._busy: set = set()      # slots taken and not yet answered
        self._done: dict = {}        # slot -> (result, exc) for a blocking caller to pick up
        self._futures: dict = {}
        self._abandoned: set = set()  # slots whose caller stopped waiting
        self._sent_files: dict = {}  # slot -> one-shot request file the server has not read yet
        self._req_bank = self._resp_bank = None
        self._req_views = self._resp_views = None
        self._closed_seen = None  # None, "closed" or "dead"
        self._registered = False
        self._contacted = False  # a message reached the server once: losing it now means it died
        self._server_pid = None
        self._reader = None
        self._buf = bytearray(W.HLEN + W.INLINE_MAX + 64)
        self._view = memoryview(self._buf)

    def _forget_parent(self) -> None:
        """In a fork child: drop the parent's socket and state (never used here)."""
        for s in (self._sock, self._probe[1] if self._probe else None):
            if s is not None:
                try:
                    s.close()  # the child's copy of the descriptor only
                except OSError:
                    pass
        self._sock = self._probe = None
        self._pid = None
        self._new_locks()  # a parent thread may have held them at fork time
        self._reset_state()

    # -- connection --------------------------------------------------------------
    def _ensure_registered(self) -> None:
        if self._pid == os.getpid() and self._closed_seen is None:
            return
        with self._conn_lock:
            if self._pid == os.getpid():
                if self._closed_seen is None:
                    return
                if not self._server_reachable():
                    raise self._gone()
                self._close_socket()  # the server is back (restarted): register anew
            self._connect()

    def _connect(self) -> None:
        """Open a socket and register with the server; commit only on success."""
        self._reset_state()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(W.client_address(self._token))
            _set_timeouts(sock, LIVENESS_PERIOD_S)
            self._sock = sock
            self._send(W.pack(W.REGISTER, 0, 0.0, W.encode(os.getpid(), self._token)))
            self._contacted = True
            deadline = time.monotonic() + _REGISTER_TIMEOUT_S
            while not self._registered:
                self._pump_one(deadline)
        except BaseException:
            self._sock = None
            self._registered = False
            sock.close()
            raise
        self._pid = os.getpid()

    def _close_socket(self) -> None:
        sock, self._sock, self._pid = self._sock, None, None
        if sock is None:
            return
        if self._registered and self._closed_seen is None:
            try:
                sock.sendto(W.pack(W.BYE, self._base, 0.0), self._srv)
            except OSError:
                pass
        sock.close()
        self._registered = False

    def close(self) -> None:
        """Give this process's slots back to the server; the next call registers again."""
        if self._sock is None or self._pid != os.getpid():
            return
        with self._conn_lock:
            self._close_socket()
        with self._cv:
            futs, self._futures = self._futures, {}
        for fut in futs.values():
            try:
                fut.set_exception(ServerClosedError("the client was closed before the answer came"))
            except InvalidStateError:
                pass

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
            for name in list(self._sent_files.values()):  # nor read our one-shot request files
                unlink_segment(name)
            self._sent_files.clear()
            return ServerDeadError("the inference server is gone (its process died or its socket closed)")
        return ServerClosedError(
            "no InferenceServer is serving this MPTransport (not started yet, shut down, or its process died)")

    def _lost(self) -> Exception:
        """The server cannot be reached: read what it sent before deciding closed vs dead."""
        sock = self._sock
        if sock is not None and self._closed_seen is None and self._lock.acquire(timeout=1.0):
            try:
                while True:  # a clean shutdown left CLOSED (and maybe answers) in our queue
                    try:
                        n = sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
                    except (BlockingIOError, TimeoutError, OSError):
                        break
                    self._dispatch(n)
            except Exception:
                pass
            finally:
                self._lock.release()
        return self._gone()

    def _server_reachable(self) -> bool:
        probe = self._probe
        if probe is None or probe[0] != os.getpid():
            probe = self._probe = (os.getpid(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        try:
            probe[1].connect(self._srv)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False

    def check_alive(self) -> None:
        """Raise ServerClosedError/ServerDeadError unless the server process and socket still exist.

        ``connect`` on a datagram socket only looks the address up: it puts
        nothing in the server's (short) queue, however often it is called.
        """
        if self._closed_seen is not None:
            raise self._gone()
        pid = self._server_pid
        if (pid is not None and not W.pid_alive(pid)) or not self._server_reachable():
            raise self._lost()

    def may_still_answer(self) -> bool:
        # The reader thread resolves every pending future, with an error at worst.
        return self._reader is not None

    def _send(self, msg) -> None:
        while True:
            try:
                self._sock.sendto(msg, self._srv)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                raise self._lost() from None
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
            if slot not in self._busy or self._resp_views is None:
                return  # no request of ours waits on this slot
            views = self._resp_views[slot - self._base]
            res = self._resp_bank.layout.build([v.clone() for v in views])
            self._deliver(slot, res, None)
        elif kind == W.ANS_PICKLE or kind == W.ERR:
            payload = self._view[W.HLEN:n]
            if slot not in self._busy:
                W.drop_payload(payload)
                return
            try:
                obj = W.decode(payload)
            except FileNotFoundError:  # removed by a server shutting down
                kind, obj = W.ERR, ServerClosedError("the inference server shut down before the answer was read")
            if kind == W.ANS_PICKLE:
                self._deliver(slot, obj, None)
            else:
                self._deliver(slot, None, obj)
        elif kind == W.LAYOUT:
            which, desc = W.decode(self._view[W.HLEN:n])
            self._attach(which, desc)
        elif kind == W.REGISTERED:
            if self._registered:
                return
            cid, base, per, req, resp, spid = W.decode(self._view[W.HLEN:n])
            self._cid, self._base, self._per = cid, base, per
            self._server_pid = spid
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
            if slot not in self._busy or slot in self._done:
                return  # stale or duplicate: never free a slot twice
            self._sent_files.pop(slot, None)  # the server read our request
            fut = self._futures.pop(slot, None)
            if fut is None and slot not in self._abandoned:
                self._done[slot] = (res, exc)  # the blocked caller frees the slot once it took this
                self._cv.notify_all()
                return
            self._abandoned.discard(slot)
            self._release(slot)
        if fut is not None:
            try:
                if exc is None:
                    fut.set_result(res)
                else:
                    fut.set_exception(exc)
            except InvalidStateError:  # cancelled by its caller
                pass

    def _release(self, slot) -> None:
        """Give a slot back (caller holds ``_cv``)."""
        self._busy.discard(slot)
        self._free.append(slot)
        self._cv.notify_all()

    # -- requests ----------------------------------------------------------------------
    def _try_take(self):
        with self._cv:
            if self._free:
                slot = self._free.pop()
                self._busy.add(slot)
                return slot
        return None

    def _take_slot(self, timeout) -> int:
        slot = self._try_take()
        if slot is not None:
            return slot
        if not self._cfg["block_when_full"]:
            raise QueueFullError(f"{self._per} requests of this client already in flight (max_inflight)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._reader is None:
                with self._lock:  # nobody else reads: read answers ourselves
                    if not self._free:
                        self._pump_one(None)
            else:
                with self._cv:
                    if not self._free:
                        self._cv.wait(LIVENESS_PERIOD_S)
                self.check_alive()
            slot = self._try_take()
            if slot is not None:
                return slot
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
        payload = W.encode(td, self._token)
        if payload[:1] == b"F":
            self._sent_files[slot] = payload[1:].decode()
        self._send(W.pack(W.REQ_PICKLE, slot, _perf(), payload))

    def _start(self, td, timeout, fut=None):
        if not isinstance(td, TensorDictBase):
            raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
        self._ensure_registered()
        slot = self._take_slot(timeout)
        if fut is not None:
            with self._cv:  # registered before sending: the answer may come at once
                self._futures[slot] = fut
        try:
            self._post(td, slot)
        except BaseException:
            with self._cv:
                self._futures.pop(slot, None)
                name = self._sent_files.pop(slot, None)
                self._release(slot)
            if name is not None:  # never sent: nobody else will remove it
                unlink_segment(name)
            raise
        return slot

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        """Submit ``td`` and wait for its answer (at most ``timeout`` seconds)."""
        if self._futures or self._reader is not None:  # a reader thread owns the socket
            return wait_future(self.submit(td), timeout, self)
        slot = self._start(td, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._done
        try:
            while slot not in done:
                with self._lock:
                    if slot not in done:
                        self._pump_one(deadline)
        except BaseException:
            with self._cv:
                if slot in done:
                    done.pop(slot)
                    self._release(slot)
                else:
                    self._abandoned.add(slot)  # its answer, if any, will free the slot
            raise
        with self._cv:
            res, exc = done.pop(slot)
            self._release(slot)
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
