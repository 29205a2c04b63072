"""Blocked callers of a batch are woken in turn (threading.py): one at a time, and never stranded."""
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from tensordict import TensorDict

from rlserve import InferenceServer, ThreadingTransport
from rlserve.transports._turns import _TURN_MIN
from rlserve.transports._turns import Waiter as _Waiter


def td(v):
    return TensorDict(observation=torch.full((2,), float(v)))


def echo(batch):
    batch["action"] = batch["observation"] * 10
    return batch


def woken(w: _Waiter) -> bool:
    """True once ``w`` was released (and takes it, as the woken caller would)."""
    return w.lock.acquire(False)


def answered_batch(tr: ThreadingTransport, n: int) -> list:
    """``n`` waiters answered by one batch, as the server leaves them before waking any."""
    ws = [_Waiter() for _ in range(n)]
    for i, w in enumerate(ws):
        tr.turns.park(w, i)
    return ws


def test_a_batch_wakes_its_blocked_callers_one_after_the_other():
    tr = ThreadingTransport()
    n = _TURN_MIN
    ws = answered_batch(tr, n)
    assert not any(w.lock.acquire(False) for w in ws)  # answering wakes nobody yet
    tr.turns.wake_answered()
    assert [woken(w) for w in ws] == [True] + [False] * (n - 1)  # the first only
    for i in range(1, n):  # each woken caller wakes the next one, as ThreadingClient.__call__ does
        assert ws[i - 1].turn and ws[i - 1].result == i - 1
        ws[i - 1].turn = False
        tr.turns.pass_turn()
        assert woken(ws[i])
        assert all(w.lock.locked() for w in ws[i + 1:])  # not released: still waiting
    ws[-1].turn = False
    tr.turns.pass_turn()  # the last one puts the baton down: the next batch starts a fresh turn
    assert not tr.turns.baton.locked()


def test_a_small_batch_wakes_its_callers_at_once():
    tr = ThreadingTransport()
    ws = answered_batch(tr, _TURN_MIN - 1)
    tr.turns.wake_answered()
    assert all(woken(w) for w in ws) and not any(w.turn for w in ws)
    assert not tr.turns.baton.locked()


def test_a_later_batch_joins_the_turn_already_going_round():
    tr = ThreadingTransport()
    first = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()
    assert woken(first[0])
    second = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()  # the turn is still going round the first batch: nobody else is woken
    assert not any(woken(w) for w in first[1:] + second)
    order = first[1:] + second
    for prev, nxt in zip([first[0]] + order, order):
        prev.turn = False
        tr.turns.pass_turn()
        assert woken(nxt)


def test_a_caller_that_gave_up_is_skipped():
    tr = ThreadingTransport()
    ws = answered_batch(tr, _TURN_MIN)
    ws[0].abandoned = True  # timed out before its answer came
    tr.turns.wake_answered()
    assert woken(ws[1]) and not woken(ws[2])  # its turn went to the next caller at once


def test_a_caller_that_gives_up_just_as_its_turn_comes_passes_it_on():
    tr = ThreadingTransport()
    ws = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()  # ws[0] is woken, but its caller leaves before taking its answer
    tr.turns.abandon(ws[0])
    assert woken(ws[1])


def test_timed_out_caller_first_in_a_batch_does_not_strand_the_others():
    """End to end, with the server's fallback switched off: the turn itself must get past the quitter."""
    tr = ThreadingTransport()
    tr.turns.release_answered = lambda: None  # the fallbacks that would wake everyone: off

    def slow(batch):
        time.sleep(0.6)  # the first caller's timeout expires during the forward
        return echo(batch)

    with InferenceServer(slow, tr, max_batch_size=8, min_batch_size=_TURN_MIN, timeout=5.0):
        client = tr.client()
        got, errors = {}, []

        def call(i, timeout):
            try:
                got[i] = client(td(i), timeout=timeout)
            except BaseException as e:
                errors.append((i, e))

        first = threading.Thread(target=call, args=(0, 0.2))
        first.start()
        time.sleep(0.05)  # queued first: first in the batch, first in turn
        rest = [threading.Thread(target=call, args=(i, 5.0)) for i in range(1, _TURN_MIN)]
        [t.start() for t in rest]
        [t.join(10) for t in [first, *rest]]
    assert [i for i, e in errors] == [0] and isinstance(errors[0][1], TimeoutError)
    for i in range(1, _TURN_MIN):
        assert torch.equal(got[i]["action"], torch.full((2,), 10.0 * i))


def test_the_server_wakes_callers_whose_turn_never_comes():
    """A caller woken in turn that dies before passing it on (an interrupt at the wrong bytecode)."""
    tr = ThreadingTransport()
    with InferenceServer(echo, tr, max_batch_size=8):
        assert tr.client()(td(1), timeout=5) is not None
        stranded = _Waiter()
        tr.turns.baton.acquire()  # held by the caller that died with it
        tr.turns.queue.append(stranded)
        # the idle server notices within its idle poll (50 ms) and puts the baton down
        assert stranded.lock.acquire(timeout=2.0)
        assert not tr.turns.baton.locked()
        client = tr.client()
        outs = []
        ts = [threading.Thread(target=lambda i=i: outs.append((i, client(td(i), timeout=5)))) for i in range(8)]
        [t.start() for t in ts]
        [t.join(10) for t in ts]
    assert sorted(i for i, _ in outs) == list(range(8))
    for i, o in outs:
        assert torch.equal(o["action"], torch.full((2,), 10.0 * i))


@pytest.mark.parametrize("threads", [4, 24])
def test_blocking_calls_and_futures_in_the_same_batches(threads):
    """Waiters go in turn, Futures at once: every answer still reaches its own caller."""
    tr = ThreadingTransport()
    bad = []
    with InferenceServer(echo, tr, max_batch_size=8) as server:
        client = tr.client()

        def actor(i):
            for j in range(100):
                v = i * 1000 + j
                if (i + j) % 3:
                    out = client(td(v), timeout=10)
                else:
                    f: Future = client.submit(td(v))
                    out = f.result(10)
                if not torch.equal(out["action"], torch.full((2,), 10.0 * v)):
                    bad.append(v)

        ts = [threading.Thread(target=actor, args=(i,)) for i in range(threads)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        assert not any(t.is_alive() for t in ts)
        assert server.stats()["requests"] == threads * 100
    assert not bad
    assert not tr.turns.queue and not tr.turns.answered


def _call_in_thread(client, v, timeout=None):
    box = {}

    def run():
        try:
            box["out"] = client(td(v), timeout=timeout)
        except BaseException as e:
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_caller_taken_off_the_turn_by_an_interrupted_thread_still_gets_its_answer():
    """The waker pops the next caller, then a Ctrl-C lands before it releases it: nobody ever will."""
    tr = ThreadingTransport()
    real = tr.turns.pass_turn
    dropped = []

    def interrupted_once():
        if not dropped:
            dropped.append(tr.turns.queue.popleft())  # taken off the turn, never woken, baton still held
            return
        real()

    tr.turns.pass_turn = interrupted_once
    # one batch of _TURN_MIN blocked callers: woken in turn
    with InferenceServer(echo, tr, min_batch_size=_TURN_MIN, timeout=5.0, run_in_caller=False):
        client = tr.client()
        for rnd in range(2):  # the second round: the lost baton was taken over, turns go round again
            calls = [_call_in_thread(client, 10 * rnd + i) for i in range(_TURN_MIN)]
            for t, _ in calls:
                t.join(5)
            assert dropped and not any(t.is_alive() for t, _ in calls), "a caller was stranded"
            for i, (_, box) in enumerate(calls):
                assert torch.equal(box["out"]["action"], torch.full((2,), 10.0 * (10 * rnd + i)))
        assert len(dropped) == 1


def test_a_lost_turn_is_taken_over_by_the_next_batch():
    """Its holder was interrupted between waking and passing it on: the next delivery takes over."""
    from rlserve.transports import _turns as T

    tr = ThreadingTransport()
    stale = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()
    assert woken(stale[0])  # ...and its thread dies with the turn: stale[1:] wait forever
    fresh = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()  # the turn moved on a moment ago: it may still be going round
    assert not any(woken(w) for w in stale[1:] + fresh)
    tr.turns.last_pass -= 2 * T._TURN_STUCK_S  # no move for longer than a live turn ever takes
    newer = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()
    assert all(woken(w) for w in stale[1:] + fresh + newer)  # taken over: all woken at once
    after = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()
    assert woken(after[0]) and not any(woken(w) for w in after[1:])  # and turns go round again


def test_a_subclass_answering_whole_batches_through_resolve_wakes_its_callers():
    from rlserve import TransportCapabilities

    class WholeBatches(ThreadingTransport):
        capabilities = TransportCapabilities(whole_batches=True)

        def resolve_batch(self, callbacks, out, version):
            for i, cb in enumerate(callbacks):
                self.resolve(cb, out[i])

    tr = WholeBatches()
    with InferenceServer(echo, tr, policy_version_key=None):
        client = tr.client()
        assert torch.equal(client(td(4), timeout=3)["action"], torch.full((2,), 40.0))
        assert torch.equal(client.submit(td(5)).result(3)["action"], torch.full((2,), 50.0))


def test_a_lost_turn_is_taken_over_by_a_small_batch_too():
    """Batches too small to go in turn still notice a lost turn (else only 50 ms idle would)."""
    from rlserve.transports import _turns as T

    tr = ThreadingTransport()
    stale = answered_batch(tr, _TURN_MIN)
    tr.turns.wake_answered()
    assert woken(stale[0])  # its thread dies with the turn
    tr.turns.last_pass -= 2 * T._TURN_STUCK_S
    small = answered_batch(tr, 1)
    tr.turns.wake_answered()
    assert all(woken(w) for w in stale[1:] + small)
    assert not tr.turns.baton.locked()


def test_an_interrupt_while_a_timed_out_call_retires_its_mailbox_never_reuses_it():
    """Ctrl-C lands in the first Python call the timeout's handler makes: the mailbox must already be gone.

    Else the next call would reuse it while the timed-out request is still queued: two answers
    for one lock (the server dies on the second release, or the next call gets the old answer).
    """
    import sys

    from rlserve.transports import threading as T

    def slow(batch):
        time.sleep(0.3)
        return echo(batch)

    tr = ThreadingTransport()
    with InferenceServer(slow, tr, max_batch_size=8) as server:
        client = tr.client()
        client(td(0))  # this thread's mailbox exists
        busy = client.submit(td(0))  # the server is busy 0.3 s: the next call times out, still queued
        time.sleep(0.05)
        state = {"timed_out": False, "fired": False}
        call_code = T.ThreadingClient.__call__.__code__

        def tracer(frame, event, arg):
            if frame.f_code is call_code:
                def local(f, ev, a):
                    if ev == "exception" and isinstance(a[1], TimeoutError):
                        state["timed_out"] = True
                    return local
                return local
            if state["timed_out"] and not state["fired"] and frame.f_back is not None \
                    and frame.f_back.f_code is call_code:
                state["fired"] = True
                raise KeyboardInterrupt("Ctrl-C while retiring the mailbox")
            return None

        mailbox = client._local.waiter
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                client(td(1), timeout=0.05)
        finally:
            sys.settrace(None)
        assert state["fired"]
        assert getattr(client._local, "waiter", None) is not mailbox  # retired, interrupt or not
        out = client(td(2), timeout=3)
        assert torch.equal(out["action"], torch.full((2,), 20.0))  # its own answer, not call 1's
        busy.result(3)
        time.sleep(0.4)  # call 1's late answer arrives meanwhile
        assert server.is_alive
        assert torch.equal(client(td(3), timeout=3)["action"], torch.full((2,), 30.0))
