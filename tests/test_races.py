"""Races and edge cases found in review: each test forces the interleaving it guards."""
import collections
import threading
import time

import pytest
import torch
from tensordict import TensorDict, lazy_stack

from rlserve import InferenceServer, RequestError, ServerClosedError, ThreadingTransport


def td(v=1.0, n=2):
    return TensorDict(observation=torch.full((n,), float(v)))


def echo(batch):
    batch["action"] = batch["observation"] * 10
    return batch


class PausingDeque(collections.deque):
    """Pauses one chosen thread inside append(), as if preempted there."""

    pause_thread = None

    def append(self, x):
        if threading.current_thread().name == self.pause_thread:
            time.sleep(0.3)
        super().append(x)


def test_submit_racing_shutdown_never_strands_a_future():
    tr = ThreadingTransport()
    tr._q = PausingDeque()
    server = InferenceServer(echo, tr).start()
    client = tr.client()
    assert client(td()) is not None
    tr._q.pause_thread = "late"
    box = {}

    def late():
        try:
            box["fut"] = client.submit(td())
        except ServerClosedError as e:
            box["err"] = e

    t = threading.Thread(target=late, name="late")
    t.start()
    time.sleep(0.05)  # past the closed check, not yet appended
    server.shutdown()
    t.join(5)
    if "fut" in box:  # accepted: then it must be answered
        assert box["fut"].exception(timeout=2) is not None or box["fut"].result() is not None
    else:
        assert isinstance(box["err"], ServerClosedError)
    assert len(tr._q) == 0


def test_an_answer_never_reaches_the_next_call_after_a_timeout():
    def model(batch):
        if (batch["observation"] == 666).any():
            time.sleep(0.5)
        return echo(batch)

    tr = ThreadingTransport()
    with InferenceServer(model, tr, max_batch_size=1):
        client = tr.client()
        with pytest.raises(TimeoutError):
            client(td(666), timeout=0.1)
        time.sleep(0.6)  # the late answer to the first call arrives meanwhile
        out = client(td(3), timeout=5)
        assert torch.equal(out["action"], torch.full((2,), 30.0))  # not 6660


def test_negative_timeout_is_refused_before_queueing():
    tr = ThreadingTransport()
    with InferenceServer(echo, tr) as server:
        client = tr.client()
        with pytest.raises(ValueError, match="timeout"):
            client(td(), timeout=-0.5)
        assert torch.equal(client(td(2))["action"], torch.full((2,), 20.0))
        assert server.stats()["requests"] == 1


def test_failed_requests_give_their_room_back():
    tr = ThreadingTransport(max_pending=2, block_when_full=False)
    with InferenceServer(echo, tr, max_batch_size=4):
        client = tr.client()
        client(td())  # learn the layout
        for _ in range(5):  # every failure must release its slot, or the bound shrinks to nothing
            with pytest.raises(Exception):
                client(TensorDict(other=torch.ones(2)), timeout=5)
        futs = [client.submit(td()), client.submit(td())]
        assert all(f.result(timeout=5) is not None for f in futs)


def test_a_caller_waiting_for_room_is_released_by_shutdown():
    gate = threading.Event()

    def gated(batch):
        gate.wait(5)
        return echo(batch)

    tr = ThreadingTransport(max_pending=1)
    server = InferenceServer(gated, tr, max_batch_size=1).start()
    client = tr.client()
    first = client.submit(td())
    box = {}

    def waiter():
        try:
            client(td())
        except Exception as e:
            box["err"] = e

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    threading.Timer(0.5, gate.set).start()
    server.shutdown()
    t.join(3)
    assert not t.is_alive()
    assert isinstance(box["err"], ServerClosedError)
    assert first.result(timeout=1) is not None  # the running request was still answered


def test_blocking_caller_in_the_running_batch_gets_its_answer_during_shutdown():
    def slow(batch):
        time.sleep(0.8)
        return echo(batch)

    tr = ThreadingTransport()
    server = InferenceServer(slow, tr, max_batch_size=4, min_batch_size=2, timeout=5.0).start()
    client = tr.client()
    box = {}
    fut = client.submit(td(1))
    t = threading.Thread(target=lambda: box.setdefault("out", client(td(2))))
    t.start()
    time.sleep(0.2)  # both are in the forward now
    server.shutdown()
    t.join(5)
    assert torch.equal(box["out"]["action"], torch.full((2,), 20.0))
    assert torch.equal(fut.result(timeout=1)["action"], torch.full((2,), 10.0))


def test_custom_collate_fn_answers_share_no_storage_with_requests():
    tr = ThreadingTransport()
    req = td(1)
    with InferenceServer(echo, tr, collate_fn=lazy_stack):
        out = tr.client()(req)
    out["observation"].add_(100)
    assert torch.equal(req["observation"], torch.ones(2))
    assert "action" not in req.keys()


class BudgetExceeded(Exception):
    pass


def test_a_model_error_on_a_new_valid_layout_is_delivered_unchanged():
    def model(batch):
        if batch["observation"].shape[-1] == 5:
            raise BudgetExceeded("out of budget")
        return echo(batch)

    tr = ThreadingTransport()
    with InferenceServer(model, tr) as server:
        client = tr.client()
        client(td(n=2))
        with pytest.raises(BudgetExceeded, match="out of budget"):
            client(td(n=5))
        # a built-in error from a never-seen layout is explained, with the original as cause
        with pytest.raises(RequestError) as ei:
            client(TensorDict(other=torch.ones(2)))
        assert "missing keys ['observation']" in str(ei.value) and isinstance(ei.value.__cause__, KeyError)
        assert server.is_alive


def test_deadline_counts_from_the_oldest_request():
    tr = ThreadingTransport()
    with InferenceServer(echo, tr, max_batch_size=16, min_batch_size=8, timeout=0.5):
        client = tr.client()
        t0 = time.monotonic()
        first = client.submit(td())
        time.sleep(0.3)
        second = client.submit(td())
        first.result(timeout=5)
        waited = time.monotonic() - t0
        second.result(timeout=5)
    # from the oldest arrival: ~0.5 s; from the newest it would be ~0.8 s
    assert 0.45 <= waited < 0.7


def test_refused_start_changes_nothing():
    tr = ThreadingTransport()
    with InferenceServer(echo, tr):
        refused = InferenceServer(echo, tr)
        with pytest.raises(RuntimeError, match="already served"):
            refused.start()
        with pytest.raises(ServerClosedError, match="not started"):
            refused.raise_if_not_serving()
        assert torch.equal(tr.client()(td(1))["action"], torch.full((2,), 10.0))  # the first still serves


def test_num_threads_applies_to_the_serving_thread_only():
    seen = []

    def model(batch):
        seen.append(torch.get_num_threads())
        return echo(batch)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tr = ThreadingTransport()
        with InferenceServer(model, tr, num_threads=1):
            tr.client()(td())
            assert torch.get_num_threads() == 2  # the caller's setting is untouched
        assert seen == [1]
    finally:
        torch.set_num_threads(before)


def test_request_device_survives_the_fast_path():
    tr = ThreadingTransport()
    with InferenceServer(echo, tr):
        out = tr.client()(TensorDict(observation=torch.ones(2), device="cpu"))
    assert out.device == torch.device("cpu")


def test_a_put_racing_shutdown_takes_back_its_own_request_only():
    """Removing the racing request compares queue items: it must never compare TensorDicts."""
    from concurrent.futures import Future

    tr = ThreadingTransport()
    earlier = [Future() for _ in range(2)]
    for f in earlier:
        tr._put(td(1), f, None)

    class ClosingDeque(collections.deque):
        def append(self, x):  # shutdown lands right after this request is queued
            super().append(x)
            tr._closed = True

    tr._q = ClosingDeque(tr._q)
    with pytest.raises(ServerClosedError):
        tr._put(td(2), Future(), None)
    assert [cb for cb, *_ in tr._q] == earlier


def test_a_drain_racing_another_drain_keeps_what_it_took():
    """Two drainers (a caller-run batch, the exiting loop): each item comes out exactly once."""
    from concurrent.futures import Future

    tr = ThreadingTransport()
    futs = [Future() for _ in range(3)]
    for f in futs:
        tr._put(td(1), f, None)
    stolen = []

    class RacedDeque(collections.deque):
        pops = 0

        def popleft(self):
            RacedDeque.pops += 1
            if RacedDeque.pops == 2:  # the other drainer takes the last item meanwhile
                stolen.append(super().popleft())
            return super().popleft()

    tr._q = RacedDeque(tr._q)
    ins, cbs = tr.drain(64)
    assert len(stolen) == 1 and len(cbs) == 2
    assert set(map(id, cbs)) | {id(stolen[0][0])} == set(map(id, futs))
