"""The server/transport contract, as a specification: each promise, checked on every transport.

Each test runs through the same public API on threads, processes (MPTransport
with its client in this process), Ray and Monarch (servers in this driver).
"""
import threading
import time
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from helpers import Slow, doubler, seed_policy
from rlserve import (
    InferenceServer,
    InferenceTransport,
    MPTransport,
    RequestError,
    ServerClosedError,
    ServerDeadError,
    ThreadingTransport,
    TransportCapabilities,
    WeightSyncScheme,
)

KINDS = ["threads", "mp", "ray", "monarch"]


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    if request.param == "monarch":
        pytest.importorskip("monarch.actor")
    return request.param


def make_transport(kind: str) -> InferenceTransport:
    if kind == "threads":
        return ThreadingTransport()
    if kind == "mp":
        return MPTransport(max_inflight=8)  # one client here submits up to 8 at once
    if kind == "ray":
        from rlserve import RayTransport

        return RayTransport()
    from rlserve import MonarchTransport

    return MonarchTransport()


@contextmanager
def served(kind: str, model, **kw):
    """An InferenceServer on a new transport of ``kind``; yields (server, client)."""
    tr = make_transport(kind)
    try:
        with InferenceServer(model, tr, **kw) as server:
            yield server, tr.client()
    finally:
        if kind in ("ray", "monarch"):
            tr.shutdown()


def obs(*shape, value=1.0, dtype=torch.float32):
    return TensorDict(observation=torch.full(shape or (8,), value, dtype=dtype))


def slow_doubler(s: float) -> TensorDictModule:
    return TensorDictModule(Slow(s), in_keys=["observation"], out_keys=["action"])


# -- one bad request fails alone -----------------------------------------------------------
def test_a_bad_request_fails_alone(kind):
    # min_batch_size=4 with a long timeout: the bad request shares a drain with good ones
    with served(kind, seed_policy(), max_batch_size=8, min_batch_size=4, timeout=5.0) as (server, client):
        for f in [client.submit(obs()) for _ in range(4)]:  # the layout the model accepts
            f.result(timeout=30)
        futs = [client.submit(obs()), client.submit(obs(5)), client.submit(obs()), client.submit(obs())]
        with pytest.raises(RequestError, match="observation"):
            futs[1].result(timeout=30)
        for f in (futs[0], futs[2], futs[3]):
            assert f.result(timeout=30)["action"].shape == (4,)
        again = [client.submit(obs()) for _ in range(4)]
        assert all(f.result(timeout=30)["action"].shape == (4,) for f in again)  # still serving
        assert server.stats()["errors"] == 1


def test_a_request_that_is_not_a_tensordict_is_refused_at_submit(kind):
    with served(kind, doubler()) as (_, client):
        with pytest.raises(RequestError, match="TensorDict"):
            client.submit({"observation": torch.ones(8)})
        assert torch.equal(client(obs(), timeout=30)["action"], torch.full((8,), 2.0))


# -- heterogeneous requests run in groups ----------------------------------------------
def test_requests_of_different_layouts_run_in_separate_groups(kind):
    with served(kind, doubler(), max_batch_size=8, min_batch_size=6, timeout=5.0) as (server, client):
        shapes = [(3,), (5,), (3,), (2, 2), (5,), (3,)]
        futs = [client.submit(obs(*s, value=i)) for i, s in enumerate(shapes)]
        for i, (s, f) in enumerate(zip(shapes, futs)):
            assert torch.equal(f.result(timeout=30)["action"], torch.full(s, 2.0 * i))
        st = server.stats()
        assert st["requests"] == 6 and st["batches"] == 3  # one drain, three signatures, three forwards


# -- answers never alias requests ------------------------------------------------------------
def test_answers_never_alias_requests(kind):
    with served(kind, doubler()) as (_, client):
        req = obs(value=3.0)
        out = client(req, timeout=30)
        req["observation"].fill_(-1.0)  # the caller reuses its buffer
        assert torch.equal(out["observation"], torch.full((8,), 3.0))
        assert torch.equal(out["action"], torch.full((8,), 6.0))
        out["action"].fill_(0.0)  # and writes into its answer
        assert torch.equal(client(obs(value=3.0), timeout=30)["action"], torch.full((8,), 6.0))


# -- every answer says which weights produced it -------------------------------------------
@pytest.mark.parametrize("key", ["policy_version", ("meta", "version")])
def test_every_answer_is_stamped_with_its_policy_version(kind, key):
    policy = seed_policy()
    with served(kind, policy, policy_version_key=key) as (server, client):
        assert int(client(obs(), timeout=30)[key]) == 0
        new = {k: v + 1 for k, v in policy.state_dict().items()}
        assert server.update_weights(new, version=7) == 7
        out = client(obs(), timeout=30)
        assert int(out[key]) == 7
        want = seed_policy()
        want.load_state_dict(new)
        assert torch.allclose(out["action"], want(obs())["action"], atol=1e-5)


def test_no_stamp_when_the_version_key_is_none(kind):
    with served(kind, doubler(), policy_version_key=None) as (_, client):
        assert set(client(obs(), timeout=30).keys()) == {"observation", "action"}


# -- shutdown answers every pending request -----------------------------------------------
def test_shutdown_answers_every_pending_request(kind):
    with served(kind, slow_doubler(0.3), max_batch_size=1) as (server, client):
        client(obs(), timeout=30)  # the path is warm
        futs = [client.submit(obs(value=i)) for i in range(5)]
        futs[0].result(timeout=30)  # the server works through them, one per 0.3 s
        t0 = time.monotonic()
        server.shutdown(timeout=5)
        answered = closed = 0
        for i, f in enumerate(futs):
            try:
                out = f.result(timeout=10)
                assert torch.equal(out["action"], torch.full((8,), 2.0 * i))
                answered += 1
            except ServerClosedError:
                closed += 1
        assert answered >= 1 and answered + closed == 5
        assert time.monotonic() - t0 < 6
        with pytest.raises(ServerClosedError):
            client(obs(), timeout=10)


# -- a dead server turns into an exception within about a second --------------------------
class Exploding(WeightSyncScheme):
    """A weight source that breaks once armed: the serving loop dies of it."""

    def __init__(self):
        self.armed = threading.Event()

    def send(self, model=None, weights=None) -> int:
        return 0

    def receive(self):
        if self.armed.is_set():
            raise RuntimeError("the weight source broke")
        return None


def test_a_dead_server_raises_within_a_second(kind):
    scheme = Exploding()
    with served(kind, slow_doubler(0.5), max_batch_size=1, weight_sync=scheme) as (server, client):
        client(obs(), timeout=30)
        first = client.submit(obs(value=1.0))
        time.sleep(0.1)  # in its forward
        waiting = client.submit(obs(value=2.0))  # queued behind it
        scheme.armed.set()  # the loop dies before the next batch
        assert torch.equal(first.result(timeout=30)["action"], torch.full((8,), 2.0))
        t0 = time.monotonic()
        with pytest.raises(ServerDeadError, match="weight source broke"):
            waiting.result(timeout=10)
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        with pytest.raises(ServerDeadError):
            client(obs(), timeout=10)
        assert time.monotonic() - t0 < 1.5
        assert not server.is_alive


# -- cancelled futures are harmless -----------------------------------------------------------
def test_cancelled_futures_are_harmless(kind):
    with served(kind, slow_doubler(0.05), max_batch_size=2) as (server, client):
        futs = [client.submit(obs(value=i)) for i in range(6)]
        cancelled = [f for f in futs[1::2] if f.cancel()]
        for i, f in enumerate(futs):
            if f in cancelled:
                with pytest.raises(CancelledError):
                    f.result(timeout=0)
            else:
                assert torch.equal(f.result(timeout=30)["action"], torch.full((8,), 2.0 * i))
        assert torch.equal(client(obs(value=7.0), timeout=30)["action"], torch.full((8,), 14.0))
        assert server.is_alive


# -- what a user's own transport needs: the seed's five methods -------------------------------
class FiveMethods(InferenceTransport):
    """A transport written against the seed's ABC alone: nothing of rlserve's contract."""

    def __init__(self):
        self.items: list = []
        self.cond = threading.Condition()

    def submit(self, td):
        fut = Future()
        with self.cond:
            self.items.append((td, fut))
            self.cond.notify()
        return fut

    def drain(self, max_items):
        with self.cond:
            taken, self.items = self.items[:max_items], self.items[max_items:]
        return [td for td, _ in taken], [f for _, f in taken]

    def wait_for_work(self, timeout):
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)

    def resolve(self, callback, result):
        callback.set_result(result)

    def resolve_exception(self, callback, exc):
        callback.set_exception(exc)


class NotASubclass:
    """The same five methods on an object that does not derive from InferenceTransport."""

    def __init__(self):
        self._inner = FiveMethods()
        for name in ("submit", "drain", "wait_for_work", "resolve", "resolve_exception"):
            setattr(self, name, getattr(self._inner, name))


@pytest.mark.parametrize("make", [FiveMethods, NotASubclass], ids=["subclass", "duck-typed"])
def test_a_transport_with_only_the_seed_methods_is_served(make):
    policy = seed_policy()
    tr = make()
    with InferenceServer(policy, tr, max_batch_size=8, min_batch_size=3, timeout=2.0) as server:
        futs = [tr.submit(obs(value=i)) for i in range(2)] + [tr.submit(obs(5))]
        for i in range(2):
            out = futs[i].result(timeout=10)
            assert torch.allclose(out["action"], policy(obs(value=i))["action"], atol=1e-6)
            assert int(out["policy_version"]) == 0
        with pytest.raises(RequestError):
            futs[2].result(timeout=10)
        server.update_weights({k: v * 0 for k, v in policy.state_dict().items()}, version=3)
        out = tr.submit(obs()).result(timeout=10)
        assert int(out["policy_version"]) == 3 and torch.equal(out["action"], torch.zeros(4))


def test_an_object_without_the_methods_is_refused_clearly():
    with pytest.raises(TypeError, match="lacks.*resolve"):
        InferenceServer(seed_policy(), object())


# -- output_device, on the row path and through a whole-batch transport ---------------------
class WholeBatches(ThreadingTransport):
    """Answers whole batches (as MP, Ray and Monarch do) and keeps what it was handed."""

    capabilities = TransportCapabilities(whole_batches=True, timed_drain=True, wakeable=True)

    def __init__(self):
        super().__init__()
        self.batches = []

    def resolve_batch(self, callbacks, batch, policy_version):
        self.batches.append(batch)
        for i, cb in enumerate(callbacks):
            self.resolve(cb, batch[i])


@pytest.mark.parametrize("make", [ThreadingTransport, WholeBatches], ids=["rows", "whole-batches"])
@pytest.mark.parametrize("model", ["module", "callable"])
def test_output_device_is_honoured_on_every_path(make, model):
    # "meta" stands for a second device on a machine without a GPU: the data stay behind, the
    # placement shows. A plain TensorDictModule takes the direct path; a callable the general one.
    m = seed_policy() if model == "module" else (lambda td: td.set("action", td["observation"] * 2))
    tr = make()
    with InferenceServer(m, tr, output_device="meta") as server:
        out = tr.client().submit(obs()).result(timeout=10)
        assert server.stats()["errors"] == 0
    assert out["action"].device.type == "meta" and out["policy_version"].device.type == "meta"
    if make is WholeBatches:
        assert tr.batches and all(v.device.type == "meta" for v in tr.batches[0].values(True, True))


def test_capabilities_are_declared_as_data():
    assert ThreadingTransport.capabilities.callers_resubmit and not ThreadingTransport.capabilities.whole_batches
    assert MPTransport.capabilities.whole_batches and not MPTransport.capabilities.callers_resubmit
    assert FiveMethods.capabilities == TransportCapabilities()  # the seed's transport declares nothing
