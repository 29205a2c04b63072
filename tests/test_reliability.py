"""Bad input, failing models, cancelled futures, shutdown, dead servers, backpressure."""
import queue
import threading
import time
from concurrent.futures import CancelledError, Future

import pytest
import torch
from tensordict import TensorDict

from rlserve import (
    InferenceServer,
    InferenceTransport,
    QueueFullError,
    RequestError,
    ServerClosedError,
    ServerDeadError,
    ThreadingTransport,
)


def good():
    return TensorDict(observation=torch.randn(8))


@pytest.mark.parametrize(
    "bad, words",
    [
        (TensorDict(obs=torch.randn(8)), ["missing keys", "observation"]),
        (TensorDict(observation=torch.randn(5)), ["'observation'", "shape=[5]", "expected shape=[8]"]),
        (TensorDict(observation=torch.randn(8, dtype=torch.float64)), ["dtype=torch.float64"]),
    ],
)
def test_bad_request_fails_alone_with_a_clear_error(policy, bad, words):
    transport = ThreadingTransport()
    # min_batch_size=4 with a long timeout: the bad request shares a drain with good ones
    with InferenceServer(policy, transport, max_batch_size=8, min_batch_size=4, timeout=5.0) as server:
        client = transport.client()
        [f.result(timeout=10) for f in [client.submit(good()) for _ in range(4)]]  # learns the layout
        futs = [client.submit(good()), client.submit(bad), client.submit(good()), client.submit(good())]
        with pytest.raises(RequestError) as ei:
            futs[1].result(timeout=10)
        for w in words:
            assert w in str(ei.value)
        for f in (futs[0], futs[2], futs[3]):
            assert f.result(timeout=10)["action"].shape == (4,)
        again = [client.submit(good()) for _ in range(4)]
        assert all(f.result(timeout=10)["action"].shape == (4,) for f in again)  # still serving
        assert server.stats()["errors"] == 1


def test_non_tensordict_request_is_refused_at_submit(policy):
    transport = ThreadingTransport()
    with InferenceServer(policy, transport):
        client = transport.client()
        with pytest.raises(RequestError, match="must be a TensorDict, got dict"):
            client({"observation": torch.randn(8)})
        with pytest.raises(RequestError, match="got Tensor"):
            client.submit(torch.randn(8))
        assert client(good())["action"].shape == (4,)


class Boom(Exception):
    pass


def test_model_error_fails_only_its_batch_and_keeps_serving():
    calls = []

    def model(batch):
        calls.append(batch.shape[0])
        if (batch["observation"] < 0).any():
            raise Boom("negative observation")
        batch["action"] = batch["observation"] + 1
        return batch

    transport = ThreadingTransport()
    with InferenceServer(model, transport, max_batch_size=8) as server:
        client = transport.client()
        with pytest.raises(Boom, match="negative observation"):
            client(TensorDict(observation=-torch.ones(2)))
        assert torch.equal(client(TensorDict(observation=torch.ones(2)))["action"], torch.full((2,), 2.0))
        assert server.is_alive and server.stats()["errors"] == 1


def test_model_returning_garbage_is_an_error_for_its_callers():
    transport = ThreadingTransport()
    with InferenceServer(lambda b: b["observation"], transport) as server:
        with pytest.raises(TypeError, match="returned Tensor, expected a TensorDict"):
            transport.client()(good())
        assert server.is_alive


def test_cancelled_and_abandoned_futures_do_not_harm_the_server():
    gate = threading.Event()

    def model(batch):
        gate.wait(5)
        batch["action"] = batch["observation"] * 0
        return batch

    transport = ThreadingTransport(max_pending=64)
    with InferenceServer(model, transport, max_batch_size=4) as server:
        client = transport.client()
        futs = [client.submit(good()) for _ in range(40)]
        for f in futs[::2]:
            f.cancel()
        del futs[1::4]  # abandoned: nobody holds them any more
        gate.set()
        for f in futs:
            if not f.cancelled():
                assert f.result(timeout=10)["action"].shape == (8,)
        with pytest.raises(CancelledError):
            futs[0].result()
        assert server.is_alive
        assert client(good())["action"].shape == (8,)
        # every slot of the bound came back, cancelled ones included
        assert [client.submit(good()) for _ in range(64)][-1].result(timeout=10) is not None


def test_submit_before_start_is_served_after_it_and_after_shutdown_raises_at_once(policy):
    transport = ThreadingTransport()
    client = transport.client()
    early = client.submit(good())  # queued until a server starts (as torchrl does)
    with pytest.raises(TimeoutError):
        client(good(), timeout=0.2)  # a blocking call before start waits, up to its timeout
    assert not early.done()
    server = InferenceServer(policy, transport).start()
    assert early.result(timeout=10)["action"].shape == (4,)
    assert client(good()) is not None
    server.shutdown()
    assert not server.is_alive
    t0 = time.monotonic()
    with pytest.raises(ServerClosedError, match="shut down"):
        client(good())
    with pytest.raises(ServerClosedError):
        client.submit(good())
    assert time.monotonic() - t0 < 0.5


def test_shutdown_answers_every_pending_request():
    started = threading.Event()

    def slow(batch):
        started.set()
        time.sleep(0.3)
        batch["action"] = batch["observation"]
        return batch

    transport = ThreadingTransport()
    server = InferenceServer(slow, transport, max_batch_size=2).start()
    client = transport.client()
    futs = [client.submit(good()) for _ in range(10)]
    started.wait(5)
    server.shutdown()
    done = [f for f in futs if f.exception(timeout=5) is None]
    failed = [f for f in futs if f.exception(timeout=5) is not None]
    assert len(done) >= 1 and len(failed) >= 1  # the running batch finished; the rest were refused
    assert len(done) + len(failed) == len(futs)
    assert all(isinstance(f.exception(), ServerClosedError) for f in failed)


def test_client_timeout():
    def slow(batch):
        time.sleep(1.0)
        return batch

    transport = ThreadingTransport()
    with InferenceServer(slow, transport):
        client = transport.client()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            client(good(), timeout=0.1)
        assert time.monotonic() - t0 < 0.6
        with pytest.raises(TimeoutError):
            transport.client().__class__.__mro__[1].__call__(client, good(), timeout=0.1)  # Future path


class FlakyQueueTransport(InferenceTransport):
    """A user-written transport: only the five abstract methods (plus its drain breaking)."""

    def __init__(self, break_after=None):
        self.q = queue.Queue()
        self.drains = 0
        self.break_after = break_after

    def submit(self, td):
        fut = Future()
        self.q.put((td, fut))
        return fut

    def drain(self, max_items):
        self.drains += 1
        if self.break_after is not None and self.drains > self.break_after and not self.q.empty():
            raise OSError("transport lost its socket")
        ins, cbs = [], []
        while len(ins) < max_items:
            try:
                td, fut = self.q.get_nowait()
            except queue.Empty:
                break
            ins.append(td)
            cbs.append(fut)
        return ins, cbs

    def wait_for_work(self, timeout):
        time.sleep(min(timeout, 0.001))

    def resolve(self, callback, result):
        callback.set_result(result)

    def resolve_exception(self, callback, exc):
        callback.set_exception(exc)


def test_user_written_transport_works_unchanged(policy):
    transport = FlakyQueueTransport()
    with InferenceServer(policy, transport, max_batch_size=8) as server:
        client = transport.client()
        futs = [client.submit(good()) for _ in range(20)]
        outs = [f.result(timeout=10) for f in futs]
        assert all(o["action"].shape == (4,) for o in outs)
        assert client(good(), timeout=5)["policy_version"].item() == 0
        assert server.stats()["requests"] == 21


def test_dead_server_turns_into_an_error_within_a_second(policy):
    transport = FlakyQueueTransport(break_after=3)
    server = InferenceServer(policy, transport).start()
    client = transport.client()
    while transport.drains < 5:
        time.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(ServerDeadError, match="socket"):
        client(good())  # no timeout given: the liveness check must end the wait
    assert time.monotonic() - t0 < 1.5
    assert not server.is_alive
    with pytest.raises(ServerDeadError):
        client.submit(good())


def test_backpressure_raise_and_block():
    gate = threading.Event()

    def gated(batch):
        gate.wait(5)
        batch["action"] = batch["observation"]
        return batch

    transport = ThreadingTransport(max_pending=2, block_when_full=False)
    with InferenceServer(gated, transport, max_batch_size=1):
        client = transport.client()
        a, b = client.submit(good()), client.submit(good())
        with pytest.raises(QueueFullError, match="max_pending"):
            client.submit(good())
        gate.set()
        a.result(timeout=5), b.result(timeout=5)
        assert client(good()) is not None  # room is back

    gate.clear()
    transport = ThreadingTransport(max_pending=1)  # block_when_full=True
    with InferenceServer(gated, transport, max_batch_size=1):
        client = transport.client()
        first = client.submit(good())
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match="no room before the call's timeout"):
            client(good(), timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 0.45  # the call's own timeout, not a polling step
        threading.Timer(0.2, gate.set).start()
        assert client(good(), timeout=5) is not None  # blocked until the first was answered
        assert first.done()


def test_min_batch_size_waits_from_arrival_then_runs_partial(policy):
    transport = ThreadingTransport()
    with InferenceServer(policy, transport, max_batch_size=16, min_batch_size=8, timeout=0.2) as server:
        client = transport.client()
        t0 = time.monotonic()
        futs = [client.submit(good()) for _ in range(3)]
        [f.result(timeout=5) for f in futs]
        waited = time.monotonic() - t0
        s = server.stats()
    assert waited >= 0.19  # held for batch-mates up to the deadline...
    assert s["batch_size_hist"] == {3: 1}  # ...then ran the partial batch once


def test_stats_fields(policy):
    transport = ThreadingTransport()
    with InferenceServer(policy, transport, max_batch_size=8) as server:
        client = transport.client()
        for _ in range(20):
            client(good())
        s = server.stats()
    assert s["requests"] == 20 and s["batches"] >= 1 and s["errors"] == 0
    assert sum(k * v for k, v in s["batch_size_hist"].items()) == 20
    assert s["mean_batch_size"] == pytest.approx(20 / s["batches"])
    for k in ("p50", "p95", "p99"):
        assert s["queue_wait_ms"][k] >= 0
    assert 0 < s["forward_ms"]["p50"] <= s["forward_ms"]["p95"]
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert s["requests_per_s"] > 0 and s["policy_version"] == 0


def test_second_server_on_a_served_transport_is_refused(policy):
    transport = ThreadingTransport()
    with InferenceServer(policy, transport):
        with pytest.raises(RuntimeError, match="already served"):
            InferenceServer(policy, transport).start()
