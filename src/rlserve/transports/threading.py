"""ThreadingTransport: actors are threads of the server's process.

Hot path design (every microsecond here is paid per request):

* requests go into a ``collections.deque`` (append/popleft are atomic under
  the GIL), no lock taken;
* the server sleeps on a bare ``_thread`` lock that clients release only when
  the server has said it is sleeping, so a busy server costs clients nothing;
* a blocking ``client(td)`` waits on a per-thread reusable lock instead of a
  ``Future`` (no Condition, no allocation per request);
* blocked callers are woken in turn, not all at once (``_turns.py``);
* when the server sleeps, a blocking caller runs the batch on its own thread
  (``ServerHandle.run_inline``): no hand-over to the server and back;
* after answering a batch of actor threads, the server waits (bounded) for
  them to resubmit before its next forward (``on_batch_done``);
* ``Future`` callbacks (``submit``) are resolved at once, through ``set_result``.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Any, Sequence
from _thread import allocate_lock

from .. import _context
from .._td import TensorDictBase
from ..interaction import interaction_type, with_caller_mode
from ..errors import AnswerTimeout, QueueFullError, RequestError, ServerClosedError
from ..transport import (
    LIVENESS_PERIOD_S,
    InferenceClient,
    InferenceTransport,
    ServerHandle,
    TransportCapabilities,
    check_timeout,
    wait_live,
)
from ._turns import Turns, Waiter

__all__ = ["ThreadingTransport", "ThreadingClient"]

log = logging.getLogger("rlserve")
_perf = time.perf_counter
# After answering a batch, wait for its callers in slices of this long, at most this long per
# caller answered (about what one actor thread needs to resubmit on this class of machine, GIL included).
_RETURN_SLICE_S = 0.0002
_RETURN_PER_CALLER_S = 0.00005


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

    capabilities = TransportCapabilities(
        timed_drain=True, pending_count=True, callers_resubmit=True, wakeable=True, inline_batches=True)

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
        self._inline = None  # the server's run_inline, when it allows caller-run batches
        self._max_batch = 1
        self._wake_at = 1  # a sleeping server wants waking once this many requests are queued
        self._mark = -1  # requests queued when the newest batch began to be answered (-1: not yet)
        self.turns = Turns()  # blocked callers answered, woken in turn (_turns.py)

    # -- actor side ------------------------------------------------------------
    def submit(self, td: TensorDictBase) -> Future:
        fut = Future()
        self._put(td, fut, None)
        return fut

    def _put(self, td, callback, deadline, inline_max_forward_s: float | None = None) -> None:
        """Queue one request. ``inline_max_forward_s``: the caller would rather run an idle
        server's batch itself, while forwards average under that (None: never)."""
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
            inline = self._inline
            if inline_max_forward_s is not None and inline is not None and inline(inline_max_forward_s):
                return
            self.wake()

    def _take_room(self, deadline) -> None:
        if not self.block_when_full:
            if not self._room.acquire(blocking=False):
                raise QueueFullError(f"{self.max_pending} requests already pending (max_pending)")
            return
        room = self._room
        if _context.state.transport is self:  # the serving thread itself: it would wait for its own batch
            if not room.acquire(blocking=False):
                raise QueueFullError(f"submit() from inside a batch with {self.max_pending} requests pending: "
                                     "it cannot wait for room that only this batch frees (raise max_pending)")
            return
        wait_live(lambda s: room.acquire(timeout=s), self, deadline, accepted=False, on_timeout=lambda: QueueFullError(
            f"no room before the call's timeout: {self.max_pending} requests pending"))

    def client(self) -> ThreadingClient:
        return ThreadingClient(self)

    # -- lifecycle -------------------------------------------------------------
    def bind(self, server: ServerHandle) -> None:
        super().bind(server)
        self._inline = server.run_inline if server.inline_allowed else None
        self._max_batch = server.max_batch_size

    def open(self) -> None:
        self._closed = False

    def close(self) -> None:
        """Refuse new requests; the server then fails whatever is still queued."""
        self._closed = True
        self.wake()

    def wake(self) -> None:
        self._sleeping = False
        try:
            self._signal.release()
        except RuntimeError:  # already released by another client
            pass

    # -- server side -----------------------------------------------------------
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

    def pending(self) -> int:
        return len(self._q)

    def drain_timed(self, max_items: int) -> tuple[list, list, list[float]]:
        self._mark = -1  # a new batch: its answering has not begun
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

    def drain(self, max_items: int) -> tuple[list, list]:
        tds, cbs, _ = self.drain_timed(max_items)
        return tds, cbs

    def resolve(self, callback: Any, result: TensorDictBase) -> None:
        """Answer one caller now (``resolve_rows`` answers a batch's blocked callers in turn)."""
        try:
            callback.set_result(result)
        except InvalidStateError:  # cancelled by its caller: nobody to answer
            pass
        if self._room is not None:
            self._room.release()

    def resolve_rows(self, callbacks: Sequence, rows: Sequence[TensorDictBase]) -> None:
        """Answer a batch: Futures at once, blocked ``client(td)`` calls parked, then woken in turn."""
        if self._mark < 0:
            # Callers answered first may be back before the batch is fully answered
            # (done-callbacks): the resubmit wait counts from the queue as it is now.
            self._mark = len(self._q)
        room = self._room
        turns = self.turns
        park = turns.answered.append  # parked until wake_answered (below) wakes them in turn
        try:
            for cb, row in zip(callbacks, rows):
                if type(cb) is Waiter:
                    cb.result = row
                    park(cb)
                else:
                    try:
                        cb.set_result(row)
                    except InvalidStateError:  # cancelled by its caller: nobody to answer
                        pass
                    except Exception:  # a done-callback that raised: its caller's problem alone
                        log.exception("rlserve: a done-callback raised")
                if room is not None:
                    room.release()
        finally:
            turns.wake_answered()

    def resolve_exception(self, callback: Any, exc: BaseException) -> None:
        try:
            callback.set_exception(exc)
        except InvalidStateError:
            pass
        if self._room is not None:
            self._room.release()

    def on_batch_done(self, n: int) -> None:
        if self.capabilities.callers_resubmit and n > 1:
            self._let_callers_return(n)
        elif 0 < len(self._q) < self._max_batch:
            # Requests are queued but the batch is not full: hand the GIL over once
            # so request threads about to enqueue do so before the next drain.
            time.sleep(0)

    def on_idle(self) -> None:
        self.turns.release_answered()  # a turn-by-turn wake-up cut short

    def _let_callers_return(self, answered: int) -> None:
        """Give the actor threads just answered the GIL to resubmit before the next forward.

        Their next requests join the next batch (fuller batches), and the
        forward then runs while they wait instead of handing the GIL to them
        at every torch op. Waits in slices while they keep coming back, and
        stops at the first slice in which none does (slow actors, or fewer
        actors than answered requests).
        """
        have = len(self._q)
        mark, self._mark = self._mark, -1
        target = (mark if 0 <= mark <= have else have) + answered
        cap = self.max_pending
        if cap is not None and target > cap:
            target = cap  # max_pending admits no more: waiting for them would only idle the server
        end = _perf() + answered * _RETURN_PER_CALLER_S
        server = self._server
        try:
            while True:
                left = end - _perf()
                if left <= 0:
                    return
                self._wait_for_count(target, min(left, _RETURN_SLICE_S))
                now = len(self._q)
                if now >= target or now == have or (server is not None and server.stopping):
                    return
                have = now
        finally:
            self.turns.release_answered()  # callers still waiting for their turn: slow, or a turn cut short


class ThreadingClient(InferenceClient):
    """Client for :class:`ThreadingTransport`; blocking calls skip the Future."""

    def __init__(self, transport: ThreadingTransport):
        super().__init__(transport)
        self._local = threading.local()

    def __reduce__(self):
        raise TypeError(
            "a ThreadingTransport client serves threads of the server's own process and cannot be "
            "pickled; give actor processes an MPTransport client (or a ProcessServer's) instead")

    def submit(self, td: TensorDictBase) -> Future:
        tr = self._transport
        tr.check_alive()
        if interaction_type() is not None:  # the caller's interaction type travels with its request
            td = with_caller_mode(td)
        fut = Future()
        tr._put(td, fut, None)
        return fut

    def __call__(self, td: TensorDictBase, timeout: float | None = None) -> TensorDictBase:
        tr = self._transport
        tr.check_alive()
        if _context.state.transport is tr:
            raise _context.reentry_error()
        if interaction_type() is not None:  # the caller's interaction type travels with its request
            td = with_caller_mode(td)
        local = self._local
        try:
            w = local.waiter
        except AttributeError:
            w = local.waiter = Waiter()
        w.result = w.exc = None  # nothing stale from a call an interrupt cut short
        w.turn = False
        if timeout is None:
            deadline = None
            step = LIVENESS_PERIOD_S
        else:
            deadline = check_timeout(timeout)
            step = min(timeout, LIVENESS_PERIOD_S)
        try:
            # With no timeout the caller may run an idle server's batch itself: it would
            # wait just as long for the server (a timeout could not interrupt a forward).
            # That batch may raise here (e.g. SystemExit from the model) after answering
            # this very mailbox, hence inside the try.
            tr._put(td, w, deadline, math.inf if timeout is None else None)
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
            tr.turns.abandon(w)
            raise
        if w.turn and not w.abandoned:  # woken in turn with other callers: wake the next one first
            w.turn = False
            tr.turns.pass_turn()
        exc = w.exc
        if exc is not None:
            w.exc = None
            raise exc
        res = w.result
        w.result = None
        return res

    def _slow_wait(self, w: Waiter, deadline: float | None, timeout: float | None) -> None:
        tr = self._transport

        def rescue() -> bool:
            if not tr.turns.stranded(w):
                return False
            # Answered and taken off the turn by a thread interrupted before it woke us:
            # nobody will. Retire this mailbox (a late waker sees it abandoned) and take it.
            try:
                del self._local.waiter  # retired first, as in __call__
            except AttributeError:
                pass
            tr.turns.abandon(w)
            return True

        wait_live(lambda s: w.lock.acquire(timeout=s), tr, deadline, tick=rescue,
                  on_timeout=lambda: AnswerTimeout(f"no answer from the inference server within {timeout} s"))
