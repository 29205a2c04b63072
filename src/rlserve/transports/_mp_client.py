"""Actor half of MPTransport: the client, usable from any process.

A client pickles as the transport's token and settings only. In each process
that uses it (found by pid, so a ``fork`` copy re-registers too) it opens its
own socket, registers with the server, and gets its own range of slots. The
blocking ``client(td)`` path: match the layout, copy each leaf into the slot,
send 13 bytes, block on the socket, clone the answer out of the response
slot. ``submit`` returns a Future that a reader thread resolves.

Threads of one process may share a client. One of them at a time reads the
socket (whichever needs something and finds nobody reading) and hands out
whatever arrives; the others wait on a condition, never on the socket, so an
answer is picked up as soon as it is read and a freed slot is taken at once
(a thread reading while it waits for a slot is kicked awake by the thread that
frees one). ``timeout=`` bounds the whole call: registration, slot and answer.

State is committed only once the server has accepted the registration, so a
failed attempt (server not started, refused, gone) leaves the client ready to
try again on its next call; so does ``close()``.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Callable

from .. import _context
from .._td import TensorDictBase
from ..interaction import with_caller_mode
from ..errors import AnswerTimeout, QueueFullError, RequestError, ServerClosedError, ServerDeadError
from ..transport import LIVENESS_PERIOD_S, InferenceClient, check_timeout
from . import _wire as W
from ._shm import Bank, unlink_segment

_perf = time.perf_counter
_REGISTER_TIMEOUT_S = 60.0
_SERVER_POLL_S = 0.02  # how often a client made before start() looks for the server
_LIVE_CLIENTS: "weakref.WeakSet[MPClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A fork child must not keep its parent's client sockets open: answers
    # meant for the parent would queue here, and the parent's address would
    # outlive it. The child re-registers on its next call.
    for c in list(_LIVE_CLIENTS):
        c._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ServerRestarted(Exception):
    """Internal: the server restarted since this client registered; the request did not run."""


def _restarted_error() -> ServerClosedError:
    return ServerClosedError("the inference server restarted before running this request; submit it again")


def _set_timeouts(sock, seconds: float) -> None:
    # Kernel-side timeouts keep the socket "blocking" for Python: one syscall
    # per recv instead of poll + recv.
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class MPClient(InferenceClient):
    """Client of an :class:`~rlserve.MPTransport`; picklable, works in any process."""

    def __init__(self, cfg: dict, transport=None):
        super().__init__(transport)  # the transport only in the creating process; never pickled
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
        self._cv = threading.Condition(threading.Lock())  # guards the state below; slot freed / answer in
        self._conn_lock = threading.Lock()  # one registration at a time
        self._deferred: list = []  # (request, future) submitted before the server started

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
        self._reader = None  # the thread reading for submit() futures while no caller does
        self._reading = False  # a thread is reading the socket (one at a time)
        self._reader_wants_slot = False  # ...and waits for a free slot: kick it when one is freed
        self._addr = None  # our socket's address (for kicks)
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
    def _ensure_registered(self, deadline: float | None) -> None:
        if self._pid == os.getpid() and self._closed_seen is None:
            return
        if not self._conn_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise AnswerTimeout("no answer from the inference server in time (still registering)")
        try:
            if self._pid == os.getpid():
                if self._closed_seen is None:
                    return
                if not self._server_reachable():
                    raise self._gone()
                self._close_socket()  # the server is back (restarted): register anew
            self._wait_for_server(deadline)
            self._connect(deadline)
        finally:
            self._conn_lock.release()

    def _closed_here(self) -> bool:
        """This process holds the transport and knows its server stopped (so no point waiting for one)."""
        tr = self._transport
        if tr is None:
            return False
        server = tr.server  # in a fork child: the parent's server, which does not serve here
        return tr.closed_here or (server is not None and not server.accepting)

    def _wait_for_server(self, deadline: float | None) -> None:
        """A server not started yet: wait for it (requests made before ``start()`` are served after it)."""
        while not self._server_reachable():
            if self._closed_here():
                raise ServerClosedError("the inference server is shut down")
            if deadline is not None and time.monotonic() >= deadline:
                raise AnswerTimeout("no InferenceServer served this MPTransport before the call's timeout "
                                   "(not started yet, or shut down)")
            time.sleep(_SERVER_POLL_S)

    def _connect(self, deadline: float | None) -> None:
        """Open a socket and register with the server; commit only on success."""
        self._reset_state()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        limit = time.monotonic() + _REGISTER_TIMEOUT_S
        deadline = limit if deadline is None else min(deadline, limit)
        try:
            addr = W.client_address(self._token)
            sock.bind(addr)
            _set_timeouts(sock, LIVENESS_PERIOD_S)
            self._sock, self._addr = sock, addr
            self._send(W.pack(W.REGISTER, 0, 0.0, W.encode(os.getpid(), self._token)))
            self._contacted = True
            while not self._registered:  # nobody else reads a socket not yet committed
                if not self._pump_one(deadline) and time.monotonic() >= deadline:
                    raise AnswerTimeout("no answer from the inference server in time (registering)")
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

    def _lost(self, reading: bool) -> Exception:
        """The server cannot be reached: read what it sent before deciding closed vs dead.

        ``reading``: this thread holds the reading turn; else it takes the
        turn if free, or gives the thread holding it a liveness period to read.
        """
        if not reading and self._sock is not None:
            with self._cv:
                if self._reading:
                    self._cv.wait_for(lambda: self._closed_seen is not None or not self._reading, LIVENESS_PERIOD_S)
                if self._reading or self._closed_seen is not None:
                    return self._gone()
                self._reading = True
            try:
                self._drain_queue()
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()
        elif reading:
            self._drain_queue()
        return self._gone()

    def _drain_queue(self) -> None:
        """Dispatch what is already queued on our socket (a clean shutdown left CLOSED there)."""
        sock = self._sock
        if sock is None or self._closed_seen is not None:
            return
        try:
            while True:
                try:
                    n = sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, TimeoutError, OSError):
                    break
                self._dispatch(n)
        except Exception:
            pass

    def _server_reachable(self) -> bool:
        probe = self._probe
        if probe is None or probe[0] != os.getpid():
            probe = self._probe = (os.getpid(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        try:
            probe[1].connect(self._srv)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False

    def check_alive(self, reading: bool = False) -> None:
        """Raise ServerClosedError/ServerDeadError unless the server process and socket still exist.

        ``connect`` on a datagram socket only looks the address up: it puts
        nothing in the server's (short) queue, however often it is called.
        """
        if self._closed_seen is not None:
            raise self._gone()
        pid = self._server_pid
        if (pid is not None and not W.pid_alive(pid)) or not self._server_reachable():
            raise self._lost(reading)

    def may_still_answer(self) -> bool:
        return False  # the server answers through this socket only while it is reachable

    def _send(self, msg) -> None:
        while True:
            try:
                self._sock.sendto(msg, self._srv)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                raise self._lost(False) from None
            except (BlockingIOError, TimeoutError):
                self._contacted = True  # a live server whose queue is full: it drains it soon
                self.check_alive()

    # -- receiving ---------------------------------------------------------------------
    def _pump_one(self, deadline: float | None) -> bool:
        """Read and dispatch one message; False if none came within the liveness period (or
        before ``deadline``). Only the thread holding the reading turn calls this."""
        sock = self._sock
        try:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < LIVENESS_PERIOD_S:
                # a deadline sooner than the socket's own timeout: wait for exactly that long
                if not select.select([sock], [], [], max(0.0, left))[0]:
                    raise TimeoutError
                n = sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            else:
                n = sock.recv_into(self._buf)
        except (BlockingIOError, TimeoutError):
            self.check_alive(reading=True)
            return False
        self._dispatch(n)
        return True

    def _await(self, ready: Callable[[], bool], deadline: float | None, wants_slot: bool = False) -> bool:
        """Block until ``ready()`` (evaluated under ``_cv``); False once ``deadline`` passed first.

        Whoever finds nobody reading takes the reading turn: it reads one
        message (or waits out one liveness period), hands out what came, and
        gives the turn back, so a waiting thread picks up its answer as soon
        as anyone reads it. Raises if the server is gone.
        """
        cv = self._cv
        with cv:
            while not ready():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if self._closed_seen is not None:
                    if self._closed_seen == "closed" and self._server_reachable():
                        raise _ServerRestarted()  # shut down, then started again: register anew
                    raise self._gone()
                if self._reading:
                    left = LIVENESS_PERIOD_S if deadline is None else min(LIVENESS_PERIOD_S, deadline - time.monotonic())
                    cv.wait(max(0.0, left))
                    continue
                self._reading = True
                self._reader_wants_slot = wants_slot
                cv.release()
                try:
                    self._pump_one(deadline)
                finally:
                    cv.acquire()
                    self._reading = False
                    self._reader_wants_slot = False
                    cv.notify_all()  # a waiting thread may take the turn over
        return True

    def _kick(self) -> None:
        """Wake the thread reading the socket (it waits for a slot that was just freed)."""
        try:
            self._sock.sendto(W.pack(W.KICK, 0, 0.0), socket.MSG_DONTWAIT, self._addr)
        except OSError:  # our own queue is full: the reader has messages to read anyway
            pass

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
        elif kind == W.STALE:  # the server restarted since we registered: this request was not run
            if slot in self._busy:
                self._deliver(slot, None, _ServerRestarted())
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
            if isinstance(exc, _ServerRestarted):
                exc = _restarted_error()
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
        if self._reader_wants_slot:
            self._kick()

    # -- requests ----------------------------------------------------------------------
    def _try_take(self):
        with self._cv:
            if self._free:
                slot = self._free.pop()
                self._busy.add(slot)
                return slot
        return None

    def _take_slot(self, deadline: float | None) -> int:
        slot = self._try_take()
        if slot is not None:
            return slot
        if not self._cfg["block_when_full"]:
            raise QueueFullError(f"{self._per} requests of this client already in flight (max_inflight)")
        got = []

        def take() -> bool:  # under _cv
            if self._free:
                slot = self._free.pop()
                self._busy.add(slot)
                got.append(slot)
                return True
            return False

        if not self._await(take, deadline, wants_slot=True):
            raise QueueFullError(f"no free slot before the call's timeout: {self._per} requests in flight")
        return got[0]

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

    def _start(self, td, deadline: float | None, fut=None):
        if not isinstance(td, TensorDictBase):
            raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
        td = with_caller_mode(td)  # the caller's interaction type travels with its request
        self._ensure_registered(deadline)
        slot = self._take_slot(deadline)
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
        """Submit ``td`` and wait for its answer; ``timeout`` bounds the whole call."""
        deadline = check_timeout(timeout)
        if self._transport is not None and _context.state.transport is self._transport:
            raise _context.reentry_error()
        try:
            return self._call(td, deadline, timeout)
        except _ServerRestarted:  # the request never ran: register with the new server, send it again
            self._forget_registration()
        try:
            return self._call(td, deadline, timeout)
        except _ServerRestarted:
            raise ServerClosedError("the inference server restarted twice during this call") from None

    def _forget_registration(self) -> None:
        """Drop a registration the server no longer knows; the next call registers again. Futures
        still waiting on it were sent to the old server: they fail (submit them again)."""
        with self._conn_lock:
            sock, self._sock, self._pid = self._sock, None, None
            self._registered = False
            if sock is not None:
                sock.close()
        with self._cv:
            futs, self._futures = self._futures, {}
        for fut in futs.values():
            try:
                fut.set_exception(_restarted_error())
            except InvalidStateError:
                pass

    def _call(self, td: TensorDictBase, deadline: float | None, timeout: float | None) -> TensorDictBase:
        slot = self._start(td, deadline)
        done = self._done
        try:
            if not self._await(lambda: slot in done, deadline):
                raise AnswerTimeout(f"no answer from the inference server within {timeout} s")
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
        """Submit ``td``; returns a Future (resolved by whichever thread of this process reads).

        Before the server started, the request waits here and is sent once it runs.
        """
        fut = Future()
        if self._pid != os.getpid() and not self._server_reachable() and not self._closed_here():
            if not isinstance(td, TensorDictBase):
                raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
            with self._cv:  # not started yet: the reader thread sends it once the server runs
                self._deferred.append((with_caller_mode(td), fut))
        else:
            self._start(td, None, fut)
        with self._cv:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_loop, name="rlserve-mp-reader", daemon=True)
                self._reader.start()
        return fut

    def _send_deferred(self) -> None:
        """Requests submitted before the server started: register (waiting for it), then send them."""
        with self._cv:
            deferred, self._deferred = self._deferred, []
        if not deferred:
            return
        try:
            self._ensure_registered(None)
        except BaseException as e:
            for _, fut in deferred:
                fut.set_exception(e)
            return
        for td, fut in deferred:
            try:
                self._start(td, None, fut)
            except BaseException as e:
                fut.set_exception(e)

    def _read_loop(self) -> None:
        """Read for submit() futures while any is pending (taking turns with blocked callers)."""
        def settled() -> bool:  # under _cv
            if self._deferred:
                return True  # requests made before the server started: go and send them
            if self._futures:
                return False
            self._reader = None
            return True

        try:
            while True:
                self._send_deferred()
                self._await(settled, None)
                with self._cv:
                    if self._reader is None:
                        return
        except BaseException as e:  # server gone (or restarted): fail every pending future
            if isinstance(e, _ServerRestarted):
                e = _restarted_error()
                self._forget_registration()
            with self._cv:
                futs, self._futures = self._futures, {}
                self._reader = None
            for fut in futs.values():
                try:
                    fut.set_exception(e)
                except InvalidStateError:
                    pass
