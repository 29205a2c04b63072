"""One registration of an MPClient with one MPTransport server.

A registration owns everything that is only meaningful to the server that
accepted it: the socket, the range of slots, the shared-memory banks, the
slots taken and the answers not yet picked up, the futures waiting, and the
reading turn. Every call works through the registration it started with, so
when the server restarts, the client builds a new registration and *retires*
the old one; slot numbers, banks and answers of the two never mix. Retiring
wakes the old registration's blocked callers (they send their request again
on the new one) and fails its futures (submit again).

The socket of a retired registration is closed only when no thread holds the
registration any more (garbage collection), never under a thread that may be
using it: a descriptor closed under a reader can be reused by the next socket.
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

from ..errors import AnswerTimeout, QueueFullError, ServerClosedError, ServerDeadError
from ..transport import LIVENESS_PERIOD_S
from . import _wire as W
from ._shm import Bank, unlink_segment

_perf = time.perf_counter
_REGISTER_TIMEOUT_S = 60.0


class ServerRestarted(Exception):
    """Internal: this registration is over (the server restarted); the request did not run here."""


def restarted_error() -> ServerClosedError:
    return ServerClosedError("the inference server restarted before running this request; submit it again")


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    # Kernel-side timeouts keep the socket "blocking" for Python: one syscall
    # per recv instead of poll + recv.
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _fail(futures, error_of: Callable[[], BaseException]) -> None:
    for fut in futures:
        try:
            fut.set_exception(error_of())
        except InvalidStateError:  # cancelled by its caller
            pass


class Probe:
    """Whether the server's socket exists, looked up per process.

    ``connect`` on a datagram socket only looks the address up: it puts
    nothing in the server's (short) queue, however often it is called.
    """

    def __init__(self, server_address: bytes):
        self._srv = server_address
        self._sock: tuple[int, socket.socket] | None = None

    def reachable(self) -> bool:
        probe = self._sock
        if probe is None or probe[0] != os.getpid():
            probe = self._sock = (os.getpid(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        try:
            probe[1].connect(self._srv)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False

    def forget_parent(self) -> None:
        """In a fork child: close this process's copy of the parent's probe."""
        if self._sock is not None:
            try:
                self._sock[1].close()
            except OSError:
                pass
        self._sock = None


class Registration:
    """The state of one registration (see the module docstring); its methods are the client's
    wire protocol. ``cv`` guards the mutable state; one thread at a time reads the socket."""

    def __init__(self, token: str, server_address: bytes, probe: Probe):
        self.token, self.srv, self.probe = token, server_address, probe
        self.cv = threading.Condition(threading.Lock())
        self.sock: socket.socket | None = None
        self.addr: bytes | None = None
        self.base = self.per = self.cid = 0
        self.free: list = []
        self.busy: set = set()        # slots taken and not yet answered
        self.done: dict = {}          # slot -> (result, exc) for a blocking caller to pick up
        self.futures: dict = {}
        self.abandoned: set = set()   # slots whose caller stopped waiting
        self.sent_files: dict = {}    # slot -> one-shot request file the server has not read yet
        self.req_bank = self.resp_bank = None
        self.req_views = self.resp_views = None
        self.closed_seen: str | None = None  # None, "closed" or "dead"
        self.registered = False
        self.contacted = False  # a message reached the server once: losing it now means it died
        self.stale = False      # the server answered STALE: it does not know this registration
        self.server_pid: int | None = None
        self.retired: Callable[[], BaseException] | None = None  # what a caller still waiting raises
        self.reader: threading.Thread | None = None  # reads for futures while no caller does
        self.reading = False  # a thread is reading the socket (one at a time)
        self.reader_wants_slot = False  # ...and waits for a free slot: kick it when one is freed
        self.buf = bytearray(W.HLEN + W.INLINE_MAX + 64)
        self.view = memoryview(self.buf)

    def live(self) -> bool:
        return self.registered and self.closed_seen is None and self.retired is None and not self.stale

    # -- registering and retiring ---------------------------------------------------------
    def connect(self, deadline: float | None) -> None:
        """Open a socket and register with the server; raises (leaving nothing open) on failure."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        limit = time.monotonic() + _REGISTER_TIMEOUT_S
        deadline = limit if deadline is None else min(deadline, limit)
        try:
            addr = W.client_address(self.token)
            sock.bind(addr)
            _set_timeouts(sock, LIVENESS_PERIOD_S)
            self.sock, self.addr = sock, addr
            self.send(W.pack(W.REGISTER, 0, 0.0, W.encode(os.getpid(), self.token)))
            self.contacted = True
            while not self.registered:  # nobody else knows this registration yet
                if not self.pump_one(deadline) and time.monotonic() >= deadline:
                    raise AnswerTimeout("no answer from the inference server in time (registering)")
        except BaseException:
            self.sock = None
            sock.close()
            raise
        weakref.finalize(self, sock.close)  # once no thread holds this registration

    def retire(self, caller_error: Callable[[], BaseException], future_error: Callable[[], BaseException]) -> None:
        """End this registration: callers still waiting raise ``caller_error()``, futures fail with
        ``future_error()``, the server gives the slots back (BYE) and a thread reading is woken."""
        with self.cv:
            if self.retired is not None:
                return
            self.retired = caller_error
            futs, self.futures = list(self.futures.values()), {}
            reading = self.reading
            self.cv.notify_all()
        if self.sock is not None:
            if self.registered and self.closed_seen is None and not self.stale:
                try:
                    self.sock.sendto(W.pack(W.BYE, self.base, 0.0), self.srv)
                except OSError:
                    pass
            if reading:
                self.kick()
        _fail(futs, future_error)

    def forget_parent(self) -> None:
        """In a fork child: close this process's copy of the parent's socket (no thread uses it here)."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # -- liveness -----------------------------------------------------------------------------
    def gone(self) -> Exception:
        """The error for a server we can no longer reach."""
        if self.closed_seen == "closed":
            return ServerClosedError("the inference server shut down before answering")
        if self.closed_seen == "dead" or self.registered or self.contacted:
            self.closed_seen = "dead"
            for b in (self.req_bank, self.resp_bank):  # a dead server cannot unlink them
                if b is not None:
                    unlink_segment(b.name)
            for name in list(self.sent_files.values()):  # nor read our one-shot request files
                unlink_segment(name)
            self.sent_files.clear()
            return ServerDeadError("the inference server is gone (its process died or its socket closed)")
        return ServerClosedError(
            "no InferenceServer is serving this MPTransport (not started yet, shut down, or its process died)")

    def lost(self, reading: bool) -> Exception:
        """The server cannot be reached: read what it sent before deciding closed vs dead.

        ``reading``: this thread holds the reading turn; else it takes the
        turn if free, or gives the thread holding it a liveness period to read.
        """
        if not reading and self.sock is not None:
            with self.cv:
                if self.reading:
                    self.cv.wait_for(lambda: self.closed_seen is not None or not self.reading, LIVENESS_PERIOD_S)
                if self.reading or self.closed_seen is not None:
                    return self.gone()
                self.reading = True
            try:
                self.drain_queue()
            finally:
                with self.cv:
                    self.reading = False
                    self.cv.notify_all()
        elif reading:
            self.drain_queue()
        return self.gone()

    def drain_queue(self) -> None:
        """Dispatch what is already queued on our socket (a clean shutdown left CLOSED there)."""
        sock = self.sock
        if sock is None or self.closed_seen is not None:
            return
        try:
            while True:
                try:
                    n = sock.recv_into(self.buf, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, TimeoutError, OSError):
                    break
                self.dispatch(n)
        except Exception:
            pass

    def check_alive(self, reading: bool = False) -> None:
        """Raise ServerClosedError/ServerDeadError unless the server process and socket still exist."""
        if self.closed_seen is not None:
            raise self.gone()
        pid = self.server_pid
        if (pid is not None and not W.pid_alive(pid)) or not self.probe.reachable():
            raise self.lost(reading)

    # -- sending ----------------------------------------------------------------------------
    def send(self, msg) -> None:
        while True:
            try:
                self.sock.sendto(msg, self.srv)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                raise self.lost(False) from None
            except (BlockingIOError, TimeoutError):
                self.contacted = True  # a live server whose queue is full: it drains it soon
                self.check_alive()

    def kick(self) -> None:
        """Wake the thread reading the socket (it waits for a freed slot, or the registration ended)."""
        try:
            self.sock.sendto(W.pack(W.KICK, 0, 0.0), socket.MSG_DONTWAIT, self.addr)
        except OSError:  # our own queue is full: the reader has messages to read anyway
            pass

    # -- receiving ----------------------------------------------------------------------------
    def pump_one(self, deadline: float | None) -> bool:
        """Read and dispatch one message; False if none came within the liveness period (or
        before ``deadline``). Only the thread holding the reading turn calls this."""
        sock = self.sock
        try:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < LIVENESS_PERIOD_S:
                # a deadline sooner than the socket's own timeout: wait for exactly that long
                if not select.select([sock], [], [], max(0.0, left))[0]:
                    raise TimeoutError
                n = sock.recv_into(self.buf, 0, socket.MSG_DONTWAIT)
            else:
                n = sock.recv_into(self.buf)
        except (BlockingIOError, TimeoutError):
            self.check_alive(reading=True)
            return False
        self.dispatch(n)
        return True

    def wait(self, ready: Callable[[], bool], deadline: float | None, wants_slot: bool = False) -> bool:
        """Block until ``ready()`` (evaluated under ``cv``); False once ``deadline`` passed first.

        Whoever finds nobody reading takes the reading turn: it reads one
        message (or waits out one liveness period), hands out what came, and
        gives the turn back, so a waiting thread picks up its answer as soon
        as anyone reads it. Raises if the server is gone, or ServerRestarted.
        """
        cv = self.cv
        with cv:
            while not ready():
                if self.retired is not None:
                    raise self.retired()
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if self.closed_seen is not None:
                    if self.closed_seen == "closed" and self.probe.reachable():
                        raise ServerRestarted()  # shut down, then started again: register anew
                    raise self.gone()
                if self.reading:
                    left = LIVENESS_PERIOD_S if deadline is None else min(LIVENESS_PERIOD_S, deadline - time.monotonic())
                    cv.wait(max(0.0, left))
                    continue
                self.reading = True
                self.reader_wants_slot = wants_slot
                cv.release()
                try:
                    self.pump_one(deadline)
                finally:
                    cv.acquire()
                    self.reading = False
                    self.reader_wants_slot = False
                    cv.notify_all()  # a waiting thread may take the turn over
        return True

    def dispatch(self, n: int) -> None:
        kind, slot, _ = W.HEADER.unpack_from(self.buf)
        if kind == W.ANS_FAST:
            if slot not in self.busy or self.resp_views is None:
                return  # no request of ours waits on this slot
            views = self.resp_views[slot - self.base]
            res = self.resp_bank.layout.build([v.clone() for v in views])
            self.deliver(slot, res, None)
        elif kind == W.ANS_PICKLE or kind == W.ERR:
            payload = self.view[W.HLEN:n]
            if slot not in self.busy:
                W.drop_payload(payload)
                return
            try:
                obj = W.decode(payload)
            except FileNotFoundError:  # removed by a server shutting down
                kind, obj = W.ERR, ServerClosedError("the inference server shut down before the answer was read")
            if kind == W.ANS_PICKLE:
                self.deliver(slot, obj, None)
            else:
                self.deliver(slot, None, obj)
        elif kind == W.LAYOUT:
            which, desc = W.decode(self.view[W.HLEN:n])
            self.attach(which, desc)
        elif kind == W.REGISTERED:
            if self.registered:
                return
            cid, base, per, req, resp, spid = W.decode(self.view[W.HLEN:n])
            self.cid, self.base, self.per = cid, base, per
            self.server_pid = spid
            self.free = list(range(base + per - 1, base - 1, -1))
            if req is not None:
                self.attach("req", req)
            if resp is not None:
                self.attach("resp", resp)
            self.registered = True
        elif kind == W.REFUSED:
            raise W.decode(self.view[W.HLEN:n])
        elif kind == W.STALE:  # the server restarted since we registered: this request was not run
            self.stale = True
            if slot in self.busy:
                self.deliver(slot, None, ServerRestarted())
        elif kind == W.CLOSED:
            self.closed_seen = "dead" if slot else "closed"
            if not self.registered:
                raise self.gone()

    def attach(self, which: str, desc) -> None:
        name, layout, slots = desc
        try:
            bank = Bank(name, layout, slots, create=False)
        except FileNotFoundError:  # the server shut down meanwhile (its CLOSED follows): requests go pickled
            return
        views = [bank.row_views(s) for s in range(self.base, self.base + self.per)]
        if which == "req":
            self.req_bank, self.req_views = bank, views
        else:
            self.resp_bank, self.resp_views = bank, views

    def deliver(self, slot: int, res, exc) -> None:
        with self.cv:
            if slot not in self.busy or slot in self.done:
                return  # stale or duplicate: never free a slot twice
            self.sent_files.pop(slot, None)  # the server read our request
            fut = self.futures.pop(slot, None)
            if fut is None and slot not in self.abandoned:
                self.done[slot] = (res, exc)  # the blocked caller frees the slot once it took this
                self.cv.notify_all()
                return
            self.abandoned.discard(slot)
            self.release(slot)
        if fut is not None:
            if isinstance(exc, ServerRestarted):
                exc = restarted_error()
            try:
                if exc is None:
                    fut.set_result(res)
                else:
                    fut.set_exception(exc)
            except InvalidStateError:  # cancelled by its caller
                pass

    def release(self, slot: int) -> None:
        """Give a slot back (caller holds ``cv``)."""
        self.busy.discard(slot)
        self.free.append(slot)
        self.cv.notify_all()
        if self.reader_wants_slot:
            self.kick()

    # -- requests -------------------------------------------------------------------------------
    def take_slot(self, deadline: float | None, block: bool, in_batch: bool) -> int:
        """A free slot; waits for one only if ``block`` and the caller is not the server's own batch
        (which would wait for a slot that only its own answer frees)."""
        got: list = []

        def take() -> bool:  # under cv
            if self.free:
                slot = self.free.pop()
                self.busy.add(slot)
                got.append(slot)
                return True
            return False

        with self.cv:
            if take():
                return got[0]
        if not block:
            raise QueueFullError(f"{self.per} requests of this client already in flight (max_inflight)")
        if in_batch:
            raise QueueFullError(f"submit() from inside a batch with all {self.per} slots of this client in "
                                 "flight: it cannot wait for a slot that only this batch frees (raise max_inflight)")
        if not self.wait(take, deadline, wants_slot=True):
            raise QueueFullError(f"no free slot before the call's timeout: {self.per} requests in flight")
        return got[0]

    def post(self, td, slot: int) -> None:
        bank = self.req_bank
        if bank is not None:
            vals = bank.layout.match(td)
            if vals is not None:
                for dst, v in zip(self.req_views[slot - self.base], vals):
                    dst.copy_(v)
                self.send(W.HEADER.pack(W.REQ_FAST, slot, _perf()))
                return
        payload = W.encode(td, self.token)
        if payload[:1] == b"F":
            self.sent_files[slot] = payload[1:].decode()
        self.send(W.pack(W.REQ_PICKLE, slot, _perf(), payload))

    def start(self, td, deadline: float | None, fut: Future | None, block: bool, in_batch: bool) -> int:
        """Take a slot and send ``td``; with ``fut``, the answer resolves it (a reader thread reads
        while no blocked caller does)."""
        slot = self.take_slot(deadline, block, in_batch)
        if fut is not None:
            with self.cv:  # registered before sending: the answer may come at once
                if self.retired is not None:
                    self.release(slot)
                    raise ServerRestarted()
                self.futures[slot] = fut
                if self.reader is None:
                    self.reader = threading.Thread(target=self._read_loop, name="rlserve-mp-reader", daemon=True)
                    self.reader.start()
        try:
            self.post(td, slot)
        except BaseException:
            with self.cv:
                self.futures.pop(slot, None)
                name = self.sent_files.pop(slot, None)
                self.release(slot)
            if name is not None:  # never sent: nobody else will remove it
                unlink_segment(name)
            raise
        return slot

    def call(self, td, deadline: float | None, timeout: float | None, block: bool) -> object:
        """Send ``td`` and wait for its answer (ServerRestarted: send it again elsewhere)."""
        slot = self.start(td, deadline, None, block, False)
        done = self.done
        try:
            if not self.wait(lambda: slot in done, deadline):
                raise AnswerTimeout(f"no answer from the inference server within {timeout} s")
        except BaseException:
            with self.cv:
                if slot in done:
                    done.pop(slot)
                    self.release(slot)
                else:
                    self.abandoned.add(slot)  # its answer, if any, will free the slot
            raise
        with self.cv:
            res, exc = done.pop(slot)
            self.release(slot)
        if exc is not None:
            raise exc
        return res

    def _read_loop(self) -> None:
        """Read for futures while any is pending (taking turns with blocked callers)."""
        def settled() -> bool:  # under cv
            if self.futures:
                return False
            self.reader = None
            return True

        try:
            self.wait(settled, None)
        except BaseException as e:  # server gone, restarted or registration retired: fail what waits
            error = e if not isinstance(e, ServerRestarted) else None
            if isinstance(e, ServerRestarted):
                self.stale = True  # the next call registers anew
            with self.cv:
                futs, self.futures = list(self.futures.values()), {}
                self.reader = None
            _fail(futs, (lambda: error) if error is not None else restarted_error)
