"""Blocked callers of a batch are woken in turn (threading.py): one at a time, and never stranded."""
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from tensordict import TensorDict

from rlserve import InferenceServer, ThreadingTransport
from rlserve.transports.threading import _Waiter


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
        tr.resolve(w, i)
    return ws


def test_a_batch_wakes_its_blocked_callers_one_after_the_other():
    tr = ThreadingTransport()
    ws = answered_batch(tr, 3)
    assert not any(w.lock.acquire(False) for w in ws)  # answering wakes nobody yet
    tr._wake_answered()
    assert [woken(w) for w in ws] == [True, False, False]  # the first only
    for i in range(1, 3):  # each woken caller wakes the next one, as ThreadingClient.__call__ does
        assert ws[i - 1].turn and ws[i - 1].result == i - 1
        ws[i - 1].turn = False
        tr._pass_turn()
        assert woken(ws[i])
        assert all(w.lock.locked() for w in ws[i + 1:])  # not released: still waiting
    ws[2].turn = False
    tr._pass_turn()  # the last one puts the baton down: the next batch starts a fresh turn
    assert not tr._baton.locked()


def test_a_later_batch_joins_the_turn_already_going_round():
    tr = ThreadingTransport()
    first = answered_batch(tr, 2)
    tr._wake_answered()
    assert woken(first[0])
    second = answered_batch(tr, 2)
    tr._wake_answered()  # the turn is still going round the first batch: nobody else is woken
    assert not woken(first[1]) and not woken(second[0])
    order = first[1:] + second
    for prev, nxt in zip([first[0]] + order, order):
        prev.turn = False
        tr._pass_turn()
        assert woken(nxt)


def test_a_caller_that_gave_up_is_skipped():
    tr = ThreadingTransport()
    ws = answered_batch(tr, 3)
    ws[0].abandoned = True  # timed out before its answer came
    tr._wake_answered()
    assert woken(ws[1]) and not woken(ws[2])  # its turn went to the next caller at once


def test_a_caller_that_gives_up_just_as_its_turn_comes_passes_it_on():
    tr = ThreadingTransport()
    ws = answered_batch(tr, 2)
    tr._wake_answered()  # ws[0] is woken, but its caller leaves before taking its answer
    tr._abandon(ws[0])
    assert woken(ws[1])


def test_timed_out_caller_first_in_a_batch_does_not_strand_the_others():
    """End to end, with the server's fallback switched off: the turn itself must get past the quitter."""
    tr = ThreadingTransport()
    tr._release_answered = lambda: None  # the server looks its hooks up when it is created

    def slow(batch):
        time.sleep(0.6)  # the first caller's timeout expires during the forward
        return echo(batch)

    with InferenceServer(slow, tr, max_batch_size=8, min_batch_size=3, timeout=5.0):
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
        rest = [threading.Thread(target=call, args=(i, 5.0)) for i in (1, 2)]
        [t.start() for t in rest]
        [t.join(10) for t in [first, *rest]]
    assert [i for i, e in errors] == [0] and isinstance(errors[0][1], TimeoutError)
    for i in (1, 2):
        assert torch.equal(got[i]["action"], torch.full((2,), 10.0 * i))


def test_the_server_wakes_callers_whose_turn_never_comes():
    """A caller woken in turn that dies before passing it on (an interrupt at the wrong bytecode)."""
    tr = ThreadingTransport()
    with InferenceServer(echo, tr, max_batch_size=8):
        assert tr.client()(td(1), timeout=5) is not None
        stranded = _Waiter()
        tr._baton.acquire()  # held by the caller that died with it
        tr._turns.append(stranded)
        # the idle server notices within its idle poll (50 ms) and puts the baton down
        assert stranded.lock.acquire(timeout=2.0)
        assert not tr._baton.locked()
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
    assert not tr._turns and not tr._answered


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
    real = tr._pass_turn
    dropped = []

    def interrupted_once():
        if not dropped:
            dropped.append(tr._turns.popleft())  # taken off the turn, never woken, baton still held
            return
        real()

    tr._pass_turn = interrupted_once
    with InferenceServer(echo, tr, run_in_caller=False):
        client = tr.client()
        t, box = _call_in_thread(client, 3)
        t.join(5)
        assert dropped and not t.is_alive(), "the caller was stranded"
        assert torch.equal(box["out"]["action"], torch.full((2,), 30.0))
        # the lost baton is taken over: later batches of several callers go round as usual
        calls = [_call_in_thread(client, i, timeout=5) for i in range(8)]
        for t, box in calls:
            t.join(10)
        assert all(torch.equal(b["out"]["action"], torch.full((2,), 10.0 * i)) for i, (_, b) in enumerate(calls))


def test_a_lost_turn_is_taken_over_while_the_server_stays_busy():
    """Batches of one keep coming (never 50 ms idle): blocked callers must not wait for a lost turn."""
    tr = ThreadingTransport()
    stop = threading.Event()
    with InferenceServer(echo, tr, max_batch_size=8):
        client = tr.client()

        def busy():  # a Future every 10 ms: the server never idles the 50 ms after which it cleans up
            while not stop.is_set():
                client.submit(td(0)).result(5)
                time.sleep(0.01)

        b = threading.Thread(target=busy, daemon=True)
        b.start()
        tr._baton.acquire()  # lost by a caller interrupted between waking and passing it on
        try:
            for i in range(1, 6):
                t0 = time.monotonic()
                out = client(td(i), timeout=2)
                assert time.monotonic() - t0 < 0.5
                assert torch.equal(out["action"], torch.full((2,), 10.0 * i))
        finally:
            stop.set()
            b.join(5)


def test_a_subclass_answering_whole_batches_through_resolve_wakes_its_callers():
    class WholeBatches(ThreadingTransport):
        wants_rows = False

        def resolve_batch(self, callbacks, out, rows):
            for i, cb in enumerate(callbacks):
                self.resolve(cb, out[i])

    tr = WholeBatches()
    with InferenceServer(echo, tr, policy_version_key=None):
        client = tr.client()
        assert torch.equal(client(td(4), timeout=3)["action"], torch.full((2,), 40.0))
        assert torch.equal(client.submit(td(5)).result(3)["action"], torch.full((2,), 50.0))
