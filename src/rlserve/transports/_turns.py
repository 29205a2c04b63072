"""Waking a batch's blocked actor threads in turn, not all at once (ThreadingTransport).

Woken together, 16 threads fight for the GIL, and each lost round is a sleep
and a wake-up (~5-10 us of kernel time on a VM): at 16 threads that was ~7
context switches per request; in turn it is ~2, and throughput rose ~1.8x.
The server wakes the first caller of a batch; each woken caller wakes the
next one as soon as it runs (``pass_turn``), before it returns to its own
work. Batches with fewer than ``_TURN_MIN`` blocked callers wake them all at
once.

Liveness: no caller is stranded by the turn.

* A caller that gave up (timeout, interrupt) is skipped: whichever of the
  waker and the quitter takes the quitter's lock passes the turn on.
* A turn that has not moved for ``_TURN_STUCK_S`` while callers wait (its
  holder was interrupted between waking and passing it on) is taken over by
  the next delivered batch, which wakes everyone waiting.
* The server wakes whoever still waits when it goes idle or exits
  (``release_answered``); a caller taken off the turn but never woken
  rescues itself at its next liveness check (``stranded``).
"""
from __future__ import annotations

import time
from collections import deque
from _thread import allocate_lock

__all__ = ["Waiter", "Turns", "release"]

_perf = time.perf_counter
# A turn that has not moved on for this long while callers wait for it is lost (its holder was
# interrupted at the wrong bytecode): the next delivered batch takes it over. A live turn moves
# every few tens of microseconds; this is above the GIL's switch interval (5 ms).
_TURN_STUCK_S = 0.01
# Batches with fewer blocked callers wake them all at once: in turn, each wake-up waits for the
# one before (measured at 4 actor threads: 0.86x all at once; at 8 and more, turns win).
_TURN_MIN = 5


class Waiter:
    """A one-slot mailbox for one blocked thread; reused across that thread's calls.

    ``turn``: it was woken with the turn and must pass it on. ``abandoned``:
    its caller gave up (timeout, interrupt), so whoever wakes it passes the
    turn on instead.
    """

    __slots__ = ("lock", "result", "exc", "turn", "abandoned")

    def __init__(self):
        self.lock = allocate_lock()
        self.lock.acquire()  # held until an answer arrives
        self.result = None
        self.exc = None
        self.turn = False
        self.abandoned = False

    def set_result(self, result) -> None:
        self.result = result
        self.lock.release()

    def set_exception(self, exc: BaseException) -> None:
        self.exc = exc
        self.lock.release()


def release(w: Waiter) -> bool:
    """Wake ``w``'s caller; False if its lock was free already (a mailbox left behind by an
    interrupt at the wrong moment): never an exception into the serving loop."""
    try:
        w.lock.release()
        return True
    except RuntimeError:
        return False


class Turns:
    """The turn of one ThreadingTransport: its blocked callers answered in a batch, woken in turn."""

    def __init__(self):
        self.answered: list = []  # blocked callers answered in the batch being delivered
        self.queue: deque = deque()  # answered blocked callers waiting for their turn to be woken
        self.baton = allocate_lock()  # held by whoever must wake the next of the queue
        self.last_pass = 0.0  # when the turn last moved on (a turn stuck longer is taken over)

    def park(self, w: Waiter, result) -> None:
        """Answer a blocked caller; it is woken in turn by ``wake_answered``."""
        w.result = result
        self.answered.append(w)

    def wake_answered(self) -> None:
        """After each delivered batch: queue its blocked callers for their turn.

        Wakes the first one unless a turn is already going round (callers of
        an earlier batch still waking each other): those go on into this
        batch's callers, so at most about two threads want the GIL at once.
        Fewer than ``_TURN_MIN`` callers are all woken at once.
        """
        answered = self.answered
        if answered:
            self.answered = []
            if len(answered) < _TURN_MIN:
                for w in answered:  # too few to fight much over the GIL: no serial wake-ups
                    release(w)
            else:
                self.queue.extend(answered)
        if not self.queue:
            return
        if not self.baton.acquire(False):
            if self.queue and _perf() - self.last_pass >= _TURN_STUCK_S:
                # Lost: its holder was interrupted between waking and passing it on. Wake
                # everyone waiting and put the baton down: the next batch starts afresh.
                self.release_answered()
            return  # else the turn going round reaches them
        self.pass_turn()

    def pass_turn(self) -> None:
        """Holding the baton: wake the next caller in turn (the baton goes with it), or put it down."""
        queue = self.queue
        while True:
            try:
                w = queue.popleft()  # atomic under the GIL: each caller is woken exactly once
            except IndexError:
                try:
                    self.baton.release()
                except RuntimeError:  # released by release_answered meanwhile
                    pass
                # callers queued after popleft() failed and before release(): nobody else will wake them
                if queue and self.baton.acquire(False):
                    continue
                return
            w.turn = True
            self.last_pass = _perf()
            if not release(w):
                continue
            # A caller that gave up never takes its turn: take it back, unless its own
            # thread did (abandon); the lock decides which of us goes on.
            if not w.abandoned or not w.lock.acquire(False):
                return
            w.turn = False

    def abandon(self, w: Waiter) -> None:
        """A blocked caller leaves ``w`` for good (timeout, interrupt): pass on a turn it got."""
        w.abandoned = True
        if w.lock.acquire(False) and w.turn:
            w.turn = False
            self.pass_turn()

    def stranded(self, w: Waiter) -> bool:
        """``w`` was answered and taken off the turn, but nobody woke it (its waker was interrupted)."""
        return w.result is not None and w not in self.queue and w not in self.answered

    def release_answered(self) -> None:
        """When the server stops waiting for callers to come back: wake all still waiting for a turn.

        The turn goes round only as fast as woken callers get to run, and a
        caller interrupted between waking and passing it on would stop it:
        this bounds both. Then the baton is put down, so the next batch starts
        a fresh turn.
        """
        answered = self.answered
        if answered:  # answered through resolve() by a method that never woke them
            self.answered = []
            self.queue.extend(answered)
        queue = self.queue
        while True:
            try:
                w = queue.popleft()
            except IndexError:
                break
            release(w)
        if self.baton.locked():
            try:
                self.baton.release()
            except RuntimeError:
                pass
