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

Everything tied to one server lives in a :class:`Registration`; a call works
through the one it started with. A registration becomes current only once the
server accepted it, so a failed attempt (server not started, refused, gone)
leaves the client ready to try again on its next call; so does ``close()``.
When the server restarts, the client registers anew and retires the old
registration: blocked calls send their request again, futures fail.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError

from .. import _context
from .._td import TensorDictBase
from ..interaction import with_caller_mode
from ..errors import AnswerTimeout, RequestError, ServerClosedError, ServerDeadError
from ..transport import InferenceClient, check_timeout
from . import _wire as W
from ._mp_registration import Probe, Registration, ServerRestarted, restarted_error

_SERVER_POLL_S = 0.02  # how often a client made before start() looks for the server
_LIVE_CLIENTS: "weakref.WeakSet[MPClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A fork child must not keep its parent's client sockets open: answers
    # meant for the parent would queue here, and the parent's address would
    # outlive it. The child re-registers on its next call.
    for c in list(_LIVE_CLIENTS):
        c._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class MPClient(InferenceClient):
    """Client of an :class:`~rlserve.MPTransport`; picklable, works in any process."""

    def __init__(self, cfg: dict, transport=None):
        super().__init__(transport)  # the transport only in the creating process; never pickled
        self._cfg = cfg
        self._token = cfg["token"]
        self._srv = W.server_address(self._token)
        self._probe = Probe(self._srv)
        self._pid = None  # the process whose registration is current (None: register on next use)
        self._new_locks()
        self._reg = Registration(self._token, self._srv, self._probe)
        _LIVE_CLIENTS.add(self)

    def __reduce__(self):
        return (MPClient, (self._cfg,))

    def _new_locks(self) -> None:
        self._conn_lock = threading.Lock()  # one registration at a time
        self._lock = threading.Lock()  # guards the two below
        self._deferred: list = []  # (request, future) submitted before the server started
        self._sender = None  # the thread that sends them once it does

    def _forget_parent(self) -> None:
        """In a fork child: drop the parent's socket and registration (never used here)."""
        self._reg.forget_parent()
        self._probe.forget_parent()
        self._pid = None
        self._new_locks()  # a parent thread may have held them at fork time
        self._reg = Registration(self._token, self._srv, self._probe)

    # -- registration ------------------------------------------------------------------------
    def _ensure_registered(self, deadline: float | None) -> Registration:
        """The current registration of this process, registering (again) if there is none."""
        reg = self._reg
        if self._pid == os.getpid() and reg.live():
            return reg
        if not self._conn_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise AnswerTimeout("no answer from the inference server in time (still registering)")
        try:
            old = self._reg
            if self._pid == os.getpid():
                if old.live():
                    return old
                if old.closed_seen is not None and not self._probe.reachable():
                    raise old.gone()  # shut down or died, and not back
            self._wait_for_server(deadline)
            new = Registration(self._token, self._srv, self._probe)
            try:
                new.connect(deadline)
            except ServerDeadError:
                if self._closed_here():  # shut down here before it read our registration: not a crash
                    raise ServerClosedError("the inference server shut down before this client registered") from None
                raise
            self._reg, self._pid = new, os.getpid()
        finally:
            self._conn_lock.release()
        old.retire(ServerRestarted, restarted_error)  # its server is gone: its callers go to the new one
        return new

    def _retire(self, reg: Registration) -> None:
        """A registration the server no longer knows (it restarted): end it; the next call registers."""
        reg.retire(ServerRestarted, restarted_error)

    def _closed_here(self) -> bool:
        """This process holds the transport and knows its server stopped (so no point waiting for one)."""
        tr = self._transport
        if tr is None:
            return False
        server = tr.server  # in a fork child: the parent's server, which does not serve here
        return tr.closed_here or (server is not None and not server.accepting)

    def _wait_for_server(self, deadline: float | None) -> None:
        """A server not started yet: wait for it (requests made before ``start()`` are served after it)."""
        while not self._probe.reachable():
            if self._closed_here():
                raise ServerClosedError("the inference server is shut down")
            if deadline is not None and time.monotonic() >= deadline:
                raise AnswerTimeout("no InferenceServer served this MPTransport before the call's timeout "
                                   "(not started yet, or shut down)")
            time.sleep(_SERVER_POLL_S)

    def close(self) -> None:
        """Give this process's slots back to the server; the next call registers again."""
        if self._pid != os.getpid():
            return
        with self._conn_lock:
            reg, self._pid = self._reg, None
            self._reg = Registration(self._token, self._srv, self._probe)

        def closed() -> ServerClosedError:
            return ServerClosedError("the client was closed before the answer came")

        reg.retire(closed, closed)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- liveness ---------------------------------------------------------------------------------
    def check_alive(self) -> None:
        """Raise ServerClosedError/ServerDeadError unless the server process and socket still exist."""
        self._reg.check_alive()

    def may_still_answer(self) -> bool:
        return False  # the server answers through this socket only while it is reachable

    # -- requests ---------------------------------------------------------------------------------
    def _in_batch(self) -> bool:
        """Called from inside a batch of this client's own server (its serving thread)."""
        return self._transport is not None and _context.state.transport is self._transport

    def _on_current(self, run, deadline: float | None):
        """``run(registration)`` on the current registration; once more on a new one if the server
        restarted before running it."""
        for _ in range(2):
            reg = self._ensure_registered(deadline)
            try:
                return run(reg)
            except ServerRestarted:  # the request never ran: register with the new server, send it again
                self._retire(reg)
        raise ServerClosedError("the inference server restarted twice during this call")

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        """Submit ``td`` and wait for its answer; ``timeout`` bounds the whole call."""
        deadline = check_timeout(timeout)
        if self._in_batch():
            raise _context.reentry_error()
        if not isinstance(td, TensorDictBase):
            raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
        td = with_caller_mode(td)  # the caller's interaction type travels with its request
        block = self._cfg["block_when_full"]
        return self._on_current(lambda reg: reg.call(td, deadline, timeout, block), deadline)

    def submit(self, td: TensorDictBase) -> Future:
        """Submit ``td``; returns a Future (resolved by whichever thread of this process reads).

        Before the server started, the request waits here and is sent once it runs.
        """
        if not isinstance(td, TensorDictBase):
            raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
        td = with_caller_mode(td)
        fut = Future()
        if self._pid != os.getpid() and not self._probe.reachable() and not self._closed_here():
            with self._lock:  # not started yet: a sender thread sends it once the server runs
                self._deferred.append((td, fut))
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send_deferred, name="rlserve-mp-deferred",
                                                    daemon=True)
                    self._sender.start()
            return fut
        self._submit_now(td, fut, self._in_batch())
        return fut

    def _submit_now(self, td: TensorDictBase, fut: Future, in_batch: bool) -> None:
        block = self._cfg["block_when_full"]
        self._on_current(lambda reg: reg.start(td, None, fut, block, in_batch), None)

    def _send_deferred(self) -> None:
        """Requests submitted before the server started: register (waiting for it), then send them."""
        while True:
            with self._lock:
                deferred, self._deferred = self._deferred, []
                if not deferred:
                    self._sender = None
                    return
            for td, fut in deferred:
                try:
                    self._submit_now(td, fut, False)
                except BaseException as e:
                    try:
                        fut.set_exception(e)
                    except InvalidStateError:
                        pass
