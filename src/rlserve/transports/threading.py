"""ThreadingTransport: actors are threads of the server's process.

Hot path design (every microsecond here is paid per request):

* requests go into a ``collections.deque`` (append/popleft are atomic under
  the GIL), no lock taken;
* the server sleeps on a bare ``_thread`` lock that clients release only when
  the server has said it is sleeping, so a busy server costs clients nothing;
* a blocking ``client(td)`` waits on a per-thread reusable lock instead of a
  ``Future`` (no Condition, no allocation per request);
* blocked callers are woken in turn, not all at once: the server wakes the
  first caller of a batch, and each caller wakes the next one as soon as it
  runs (``_pass_turn``). Woken together, they would all fight for the GIL,
  and each lost round is a sleep and a wake-up (~5-10 us of kernel time on a
  VM): at 16 threads that was ~7 context switches per request, in turn it is
  ~2, and throughput rose ~1.8x (fewer than ``_TURN_MIN`` callers: all at once);
* ``Future`` callbacks (``submit``) are resolved at once, through
  ``set_result``.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from _thread import allocate_lock

from .._td import TensorDictBase
from ..errors import QueueFullError, RequestError, ServerClosedError
from ..transport import LIVENESS_PERIOD_S, InferenceClient, InferenceTransport

__all__ = ["ThreadingTransport", "ThreadingClient"]

_perf = time.perf_counter
# A turn that has not moved on for this long while callers wait for it is lost (its holder was
# interrupted at the wrong bytecode): the next delivered batch takes it over. A live turn moves
# every few tens of microseconds; this is above the GIL's switch interval (5 ms).
_TURN_STUCK_S = 0.01
# Batches with fewer blocked callers wake them all at once: in turn, each wake-up waits for the
# one before (measured at 4 actor threads: 0.86x all at once; at 8 and more, turns win).
_TURN_MIN = 5


class _Waiter:
    """A one-slot mailbox for one blocked thread; reused across that thread's calls.

    ``turn``: it was woken with the turn (see ``ThreadingTransport._pass_turn``)
    and must pass it on. ``abandoned``: its caller gave up (timeout,
    interrupt), so whoever wakes it passes the turn on instead.
    """

    __slots__ = ("lock", "result", "exc", "turn", "abandoned")

    def __init__(self):
        self.lock = allocate_lock()
        self.lock.acquire()  # held until an answer arrives
        self.result = None
        self.exc = None
        self.turn = False
        self.abandoned = False

    def set_result(self, result):
        self.result = result
        self.lock.release()

    def set_exception(self, exc):
        self.exc = exc
        self.lock.release()


def _release(w: _Waiter) -> bool:
    """Wake ``w``'s caller; False if its lock was free already (a mailbox left behind by an
    interrupt at the wrong moment): never an exception into the serving loop."""
    try:
        w.lock.release()
        return True
    except RuntimeError:
        return False


class ThreadingTransport(InferenceTransport):
    """In-process transport for actor threads.

    Args:
        max_pending: bound on requests submitted but not yet answered
            (``None``: unbounded). Backpressure for callers that ``submit``
            many futures without waiting.
        block_when_full: when the bound is reached, ``True`` makes callers
            wait for room (up to their timeout, while the server is alive);
            ``False`` raises :class:`~rlserve.QueueFullError` at once.
    """

    # Callers are actor threads of this process that resubmit as soon as they are
    # answered: the server may wait for them before its next forward (fuller batches).
    _callers_resubmit = True

    def __init__(self, max_pending: int | None = None, block_when_full: bool = True):
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 or None, got {max_pending}")
        self._q: deque = deque()
        self._sleeping = False
        self._signal = allocate_lock()
        self._signal.acquire()
        self._closed = False
        self.max_pending = max_pending
        self.block_when_full = block_when_full
        self._room = threading.Semaphore(max_pending) if max_pending else None
        self._serve_in_caller = None  # the server's hook: run an idle server's batch on the caller's thread
        self._wake_at = 1  # a sleeping server wants waking once this many requests are queued
        self._answered: list = []  # blocked callers answered in the batch being delivered
        self._turns: deque = deque()  # answered blocked callers waiting for their turn to be woken
        self._baton = allocate_lock()  # held by whoever must wake the next of _turns
        self._last_pass = 0.0  # when the turn last moved on (a turn stuck longer is taken over)

    # -- actor side ------------------------------------------------------------
    def submit(self, td: TensorDictBase) -> Future:
        fut = Future()
        self._put(td, fut, None)
        return fut

    def _put(self, td, callback, deadline, may_serve: bool = False) -> None:
        """Queue one request; ``may_serve``: the caller would rather run an idle server's batch itself."""
        if not isinstance(td, TensorDictBase):
            raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
        if self._closed:
            raise ServerClosedError("the inference server is shut down")
        if self._room is not None:
            self._take_room(deadline)
        # the callback first: remove() below compares items, and stops at the (unique) callback
        # instead of comparing TensorDicts, which raises
        item = (callback, td, _perf())
        self._q.append(item)
        if self._closed:  # shutdown raced us: it may have drained the queue for the last time
            try:
                self._q.remove(item)
            except ValueError:
                pass  # the server took it and will answer it
            else:
                if self._room is not None:
                    self._room.release()
                raise ServerClosedError("the inference server is shut down")
        if self._sleeping and len(self._q) >= self._wake_at:
            serve = self._serve_in_caller
            if may_serve and serve is not None and serve():
                return
            self._wake()

    def _take_room(self, deadline) -> None:
        if not self.block_when_full:
            if not self._room.acquire(blocking=False):
                raise QueueFullError(f"{self.max_pending} requests already pending (max_pending)")
            return
        while True:
            step = LIVENESS_PERIOD_S
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    if self._room.acquire(blocking=False):
                        return
                    raise QueueFullError(f"no room before the call's timeout: {self.max_pending} requests pending")
            if self._room.acquire(timeout=step):
                return
            self.check_alive()

    def client(self) -> "ThreadingClient":
        return ThreadingClient(self)

    def _attach(self, server) -> None:
        super()._attach(server)
        hook = getattr(server, "_caller_hook", None)
        self._serve_in_caller = hook() if hook is not None else None

    # -- server side -----------------------------------------------------------
    def _wake(self) -> None:
        self._sleeping = False
        try:
            self._signal.release()
        except RuntimeError:  # already released by another client
            pass

    def wait_for_work(self, timeout: float) -> None:
        self._wait_for_count(1, timeout)

    def _wait_for_count(self, n: int, timeout: float) -> None:
        """Sleep until ``n`` requests are queued, or ``timeout`` seconds pass (server side)."""
        if len(self._q) >= n:
            return
        self._wake_at = n
        self._sleeping = True
        try:
            if len(self._q) < n:  # re-check after raising the flag: no lost wake-up
                if timeout > 0:
                    self._signal.acquire(timeout=timeout)
                else:
                    self._signal.acquire(blocking=False)
        finally:
            self._sleeping = False
            self._wake_at = 1

    def _pending(self) -> int:
        """Requests waiting to be drained (a hint for the server's scheduling)."""
        return len(self._q)

    def drain_timed(self, max_items: int):
        q = self._q
        n = min(len(q), max_items)
        if n == 0:
            return [], [], []
        pop = q.popleft
        items = []
        try:
            for _ in range(n):
                items.append(pop())
        except IndexError:  # another thread drained meanwhile: keep what was taken
            if not items:
                return [], [], []
        cbs, tds, ts = zip(*items)
        return list(tds), list(cbs), list(ts)

    def drain(self, max_items: int):
        tds, cbs, _ = self.drain_timed(max_items)
        return tds, cbs

    def resolve(self, callback, result) -> None:
        """Answer one caller. A blocked ``client(td)`` call is only woken by ``_wake_answered()``,
        which the server calls once per delivered batch (a subclass answering outside the
        server's ``_deliver`` must call it too)."""
        if type(callback) is _Waiter:
            # A blocked client(td) call: woken in turn once the batch is answered (_wake_answered).
            callback.result = result
            self._answered.append(callback)
        else:
            try:
                callback.set_result(result)
            except InvalidStateError:  # cancelled by its caller: nobody to answer
                pass
        if self._room is not None:
            self._room.release()

    # -- waking blocked callers in turn ------------------------------------------
    def _wake_answered(self) -> None:
        """Server hook, after each delivered batch: queue its blocked callers for their turn.

        Wakes the first one unless a turn is already going round (callers of
        an earlier batch still waking each other): those go on into this
        batch's callers, so at most about two threads want the GIL at once.
        Fewer than ``_TURN_MIN`` callers are all woken at once.
        """
        answered = self._answered
        if answered:
            self._answered = []
            if len(answered) < _TURN_MIN:
                for w in answered:  # too few to fight much over the GIL: no serial wake-ups
                    _release(w)
            else:
                self._turns.extend(answered)
        if not self._turns:
            return
        if not self._baton.acquire(False):
            if self._turns and _perf() - self._last_pass >= _TURN_STUCK_S:
                # Lost: its holder was interrupted between waking and passing it on. Wake
                # everyone waiting and put the baton down: the next batch starts afresh.
                self._release_answered()
            return  # else the turn going round reaches them
        self._pass_turn()

    def _pass_turn(self) -> None:
        """Holding the baton: wake the next caller in turn (the baton goes with it), or put it down."""
        turns = self._turns
        while True:
            try:
                w = turns.popleft()  # atomic under the GIL: each caller is woken exactly once
            except IndexError:
                try:
                    self._baton.release()
                except RuntimeError:  # released by _release_answered meanwhile
                    pass
                # callers queued after popleft() failed and before release(): nobody else will wake them
                if turns and self._baton.acquire(False):
                    continue
                return
            w.turn = True
            self._last_pass = _perf()
            if not _release(w):
                continue
            # A caller that gave up never takes its turn: take it back, unless its own
            # thread did (_abandon); the lock decides which of us goes on.
            if not w.abandoned or not w.lock.acquire(False):
                return
            w.turn = False

    def _abandon(self, w: _Waiter) -> None:
        """A blocked caller leaves ``w`` for good (timeout, interrupt): pass on a turn it got."""
        w.abandoned = True
        if w.lock.acquire(False) and w.turn:
            w.turn = False
            self._pass_turn()

    def _release_answered(self) -> None:
        """Server hook, when it stops waiting for callers to come back: wake all still waiting for a turn.

        The turn goes round only as fast as woken callers get to run, and a
        caller interrupted between waking and passing it on would stop it:
        this bounds both. Then the baton is put down, so the next batch starts
        a fresh turn.
        """
        answered = self._answered
        if answered:  # answered through resolve() by a transport method that never woke them
            self._answered = []
            self._turns.extend(answered)
        turns = self._turns
        while True:
            try:
                w = turns.popleft()
            except IndexError:
                break
            _release(w)
        if self._baton.locked():
            try:
                self._baton.release()
            except RuntimeError:
                pass

    def resolve_exception(self, callback, exc: BaseException) -> None:
        try:
            callback.set_exception(exc)
        except InvalidStateError:
            pass
        if self._room is not None:
            self._room.release()

    def _close(self) -> None:
        """Refuse new requests; the server then fails whatever is still queued."""
        self._closed = True
        self._wake()

    def _reopen(self) -> None:
        self._closed = False


class ThreadingClient(InferenceClient):
    """Client for :class:`ThreadingTransport`; blocking calls skip the Future."""

    def __init__(self, transport: ThreadingTransport):
        super().__init__(transport)
        self._local = threading.local()

    def submit(self, td: TensorDictBase) -> Future:
        tr = self._transport
        tr.check_alive()
        fut = Future()
        tr._put(td, fut, None)
        return fut

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        tr = self._transport
        tr.check_alive()
        local = self._local
        try:
            w = local.waiter
        except AttributeError:
            w = local.waiter = _Waiter()
        w.result = w.exc = None  # nothing stale from a call an interrupt cut short
        w.turn = False
        if timeout is None:
            deadline = None
            step = LIVENESS_PERIOD_S
        else:
            if timeout < 0:
                raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
            deadline = time.monotonic() + timeout
            step = min(timeout, LIVENESS_PERIOD_S)
        try:
            # With no timeout the caller may run an idle server's batch itself: it would
            # wait just as long for the server (a timeout could not interrupt a forward).
            # That batch may raise here (e.g. SystemExit from the model) after answering
            # this very mailbox, hence inside the try.
            tr._put(td, w, deadline, timeout is None)
            if not w.lock.acquire(timeout=step):
                self._slow_wait(w, deadline, timeout)
        except BaseException:
            # Timed out, interrupted or refused: the answer may still arrive later,
            # so this mailbox must never serve another call: the next makes a fresh one.
            # A bare deletion first: no Python call, so no point where a signal can land
            # and leave this mailbox in place (two answers for one lock).
            try:
                del local.waiter
            except AttributeError:  # already retired by _slow_wait
                pass
            tr._abandon(w)
            raise
        if w.turn and not w.abandoned:  # woken in turn with other callers: wake the next one first
            w.turn = False
            tr._pass_turn()
        exc = w.exc
        if exc is not None:
            w.exc = None
            raise exc
        res = w.result
        w.result = None
        return res

    def _slow_wait(self, w: _Waiter, deadline, timeout) -> None:
        tr = self._transport
        while True:
            try:
                tr.check_alive()
            except ServerClosedError:
                if not tr._may_still_answer():
                    # Gone for good; one last look in case the answer just landed.
                    if w.lock.acquire(timeout=0.01):
                        return
                    raise
            step = LIVENESS_PERIOD_S
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    raise TimeoutError(f"no answer from the inference server within {timeout} s")
            if w.lock.acquire(timeout=step):
                return
            if w.result is not None and w not in tr._turns and w not in tr._answered:
                # Answered and taken off the turn by a thread interrupted before it woke us:
                # nobody will. Retire this mailbox (a late waker sees it abandoned) and take it.
                try:
                    del self._local.waiter  # retired first, as in __call__
                except AttributeError:
                    pass
                tr._abandon(w)
                return
