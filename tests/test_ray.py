"""RayTransport and RayWeightSyncScheme on a real local Ray cluster (ray.init(num_cpus=2))."""
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

ray = pytest.importorskip("ray")

from rlserve import InferenceServer, RequestError, ServerClosedError, ServerDeadError  # noqa: E402
from rlserve import RayTransport, RayWeightSyncScheme  # noqa: E402

import helpers  # noqa: E402
import remote_probes  # noqa: E402
from remote_probes import check_idle_batches_run_on_the_calling_thread, exit_payload  # noqa: E402

# Ray workers cannot import the test modules: ship their functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(remote_probes)
ray.cloudpickle.register_pickle_by_value(helpers)


from helpers import Doubler  # noqa: E402
from helpers import doubler as make_doubler  # noqa: E402


def make_affine():
    """action = c * (sum(obs) + 1) when every parameter equals c (c = 0 at start)."""
    lin = nn.Linear(8, 1)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return TensorDictModule(lin, in_keys=["observation"], out_keys=["action"])


def const_weights(c: float) -> dict:
    return {"module.weight": torch.full((1, 8), float(c)), "module.bias": torch.full((1,), float(c))}


def obs(v, n=8):
    return TensorDict(observation=torch.full((n,), float(v)))


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_local):
    yield ray_local


# Every Ray actor is a new worker process (seconds each on a busy 2-core box), so the
# servers and caller actors that no test kills are shared by the whole module. Tests
# that kill a server or a caller start their own.
@ray.remote(num_cpus=0, max_concurrency=8)
class Caller:
    """A (threaded) Ray actor that calls a client like any rlserve actor would."""

    def call(self, client, v, n=8):
        try:
            return ("ok", client(obs(v, n), timeout=30))
        except Exception as e:
            return ("err", e)

    def call_many(self, client, values):
        futs = [client.submit(obs(v)) for v in values]
        return [f.result(timeout=30) for f in futs]

    def loop_until_error(self, client, seconds):
        t_end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < t_end:
            try:
                client(obs(1), timeout=30)
                n += 1
            except Exception as e:
                return n, e, time.monotonic()
        return n, None, time.monotonic()

    def push(self, scheme, c):
        """Trainer role: set every parameter to ``c`` and send the model."""
        model = make_affine()
        scheme.init_on_sender(model=model)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(c)
        return scheme.send(model=model, wait=True)


@ray.remote(num_cpus=0)
def task_call(client, v):
    return client(obs(v), timeout=30)


@pytest.fixture(scope="module")
def callers():
    actors = [Caller.remote() for _ in range(3)]  # they start while the first server builds
    yield actors
    for a in actors:
        ray.kill(a)


@pytest.fixture(scope="module")
def doubler():
    with RayTransport(make_doubler, server_kwargs={"max_batch_size": 8}) as tr:
        yield tr


@pytest.fixture(scope="module")
def slow():
    """Answers only once six requests are pending (or after 20 s)."""
    kw = {"max_batch_size": 6, "min_batch_size": 6, "timeout": 20.0}
    with RayTransport(make_doubler, server_kwargs=kw) as tr:
        yield tr


def test_import_without_ray_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import rlserve\n"
            "try:\n    rlserve.RayTransport()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'rlserve[ray]'" in out.stdout, out.stderr


def test_actor_hosted_server_serves_actors_and_tasks(doubler, callers):
    client = doubler.client()
    outs = ray.get([a.call.remote(client, i + 1) for i, a in enumerate(callers)], timeout=60)
    for i, (kind, td) in enumerate(outs):
        assert kind == "ok", td
        assert torch.equal(td["action"], torch.full((8,), 2.0 * (i + 1)))
        assert int(td["policy_version"]) == 0
    rows = ray.get(callers[0].call_many.remote(client, [5, 6, 7]), timeout=60)  # submit() -> Futures
    assert [float(r["action"][0]) for r in rows] == [10.0, 12.0, 14.0]
    tds = ray.get([task_call.remote(client, v) for v in (3, 4)], timeout=60)  # Ray tasks
    assert [float(t["action"][0]) for t in tds] == [6.0, 8.0]
    assert float(client(obs(9))["action"][0]) == 18.0  # and the driver itself


def test_batches_form_on_the_server_from_pending_calls(slow, callers):
    # min_batch_size=6 and a long timeout: one forward for six calls from three actors
    client = slow.client()
    s0 = slow.stats()
    refs = [a.call.remote(client, i + 3 * k) for k in range(2) for i, a in enumerate(callers)]
    outs = ray.get(refs, timeout=60)
    assert sorted(float(td["action"][0]) for _, td in outs) == [2.0 * i for i in range(6)]
    s1 = slow.stats()
    assert s1["requests"] - s0["requests"] == 6 and s1["batches"] - s0["batches"] == 1, (s0, s1)


def test_driver_hosted_server_and_shutdown(callers):
    tr = RayTransport()
    try:
        client = tr.client()
        with pytest.raises(TimeoutError):  # before start a request waits for the server
            client(obs(1), timeout=0.5)
        early = client.submit(obs(5))  # ...and is served once it starts (as with torchrl)
        with InferenceServer(make_doubler(), tr, max_batch_size=8) as server:
            assert float(early.result(timeout=60)["action"][0]) == 10.0
            outs = ray.get([a.call.remote(client, i) for i, a in enumerate(callers)], timeout=60)
            assert [float(td["action"][0]) for _, td in outs] == [0.0, 2.0, 4.0]
            assert server.stats()["requests"] == 4
        kind, err = ray.get(callers[0].call.remote(client, 1), timeout=60)
        assert kind == "err" and isinstance(err, ServerClosedError)
    finally:
        tr.shutdown()


def test_driver_hosted_server_death_reaches_clients():
    class DiesOnNegative(nn.Module):
        def forward(self, x):
            if (x < 0).any():
                raise SystemExit("model asked the server loop to die")  # not an Exception: kills the loop
            return x

    tr = RayTransport(dead_after=2.0)
    try:
        server = InferenceServer(TensorDictModule(DiesOnNegative(), ["observation"], ["action"]), tr).start()
        client = tr.client()
        assert float(client(obs(1), timeout=30)["action"][0]) == 1.0
        with pytest.raises((SystemExit, ServerDeadError)):  # the request that killed it
            client(obs(-1), timeout=30)
        t0 = time.monotonic()
        with pytest.raises(ServerDeadError, match="died"):
            while time.monotonic() - t0 < 10:
                client(obs(1), timeout=30)
                time.sleep(0.1)
        assert time.monotonic() - t0 < 5
        server.shutdown()
    finally:
        tr.shutdown()


def test_an_idle_server_runs_the_batch_on_the_request_thread():
    check_idle_batches_run_on_the_calling_thread(RayTransport)


def test_a_request_raising_systemexit_while_decoded_is_answered_not_left_hanging():
    # What a Ray request thread of the server actor runs, here on a thread of this process.
    import threading

    from rlserve.transports._codec import encode_td
    from rlserve.transports._remote import WaiterQueueTransport, unwrap_reply

    tr = WaiterQueueTransport()
    with InferenceServer(make_doubler(), tr):
        out = []
        t = threading.Thread(target=lambda: out.append(tr.call(exit_payload())), daemon=True)
        t.start()
        t.join(10)
        assert out and out[0][0] == "err" and isinstance(out[0][1], SystemExit), out
        assert torch.equal(unwrap_reply(tr.call(encode_td(obs(3))))["action"], torch.full((8,), 6.0))  # still serving


def test_bad_input_fails_only_its_sender(doubler, callers):
    client = doubler.client()
    good, bad = callers[:2], callers[2]
    assert ray.get(good[0].call.remote(client, 1), timeout=60)[0] == "ok"  # the accepted layout
    with pytest.raises(RequestError, match="TensorDict"):
        client({"observation": torch.zeros(8)})  # not a TensorDict: refused before sending
    for garbage in ("garbage", b"garbage", ray.cloudpickle.dumps(((), ("x",), ("not an array",)))):
        reply = ray.get(doubler.actor.infer.remote(garbage), timeout=30)  # raw bad payloads
        assert reply[0] == "err" and isinstance(reply[1], RequestError), reply
    # a 3-wide observation works with the doubler: odd shapes are grouped, not mixed
    bad_td = ray.get(bad.call.remote(client, 1, 3), timeout=60)
    assert bad_td[0] == "ok" and bad_td[1]["action"].shape == (3,)
    outs = ray.get([g.call.remote(client, 2) for g in good], timeout=60)
    assert all(k == "ok" and float(td["action"][0]) == 4.0 for k, td in outs)


def test_model_error_for_one_layout_fails_only_that_caller(callers):
    from helpers import seed_policy

    with RayTransport(seed_policy, server_kwargs={"max_batch_size": 8}) as tr:
        client = tr.client()
        assert ray.get(callers[0].call.remote(client, 1), timeout=60)[0] == "ok"
        res = ray.get([callers[0].call.remote(client, 1, 5), callers[1].call.remote(client, 1),
                       callers[2].call.remote(client, 2)], timeout=60)
        assert res[0][0] == "err" and isinstance(res[0][1], RequestError), res[0]
        assert "observation" in str(res[0][1])
        assert res[1][0] == "ok" and res[2][0] == "ok"
        assert tr.stats()["errors"] >= 1


def test_killed_client_actor_harms_nothing(doubler, callers):
    client = doubler.client()
    victim, other = Caller.remote(), callers[0]
    assert ray.get(victim.call.remote(client, 1), timeout=60)[0] == "ok"
    victim.loop_until_error.remote(client, 30)  # busy calling when it dies
    time.sleep(0.5)
    ray.kill(victim)
    outs = ray.get([other.call.remote(client, i) for i in range(5)], timeout=60)
    assert [float(td["action"][0]) for _, td in outs] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert float(client(obs(3))["action"][0]) == 6.0


def test_killed_server_actor_gives_clear_error_fast(callers):
    tr = RayTransport(make_doubler, server_kwargs={"max_batch_size": 8})
    client = tr.client()
    caller = callers[0]
    assert ray.get(caller.call.remote(client, 1), timeout=60)[0] == "ok"
    ref = caller.loop_until_error.remote(client, 60)
    time.sleep(0.5)
    t_kill = time.monotonic()
    ray.kill(tr.actor)
    n, err, _ = ray.get(ref, timeout=60)
    assert n > 0
    assert isinstance(err, ServerDeadError) and "gone" in str(err)
    t0 = time.monotonic()
    with pytest.raises(ServerDeadError):
        client(obs(1), timeout=30)
    assert time.monotonic() - t0 < 5 and time.monotonic() - t_kill < 10
    with pytest.raises(ServerDeadError):
        client.submit(obs(1)).result(timeout=30)
    tr.shutdown()


@pytest.fixture(scope="module")
def affine():
    """A weight-synced server whose weights always equal their version (all params = v)."""
    scheme = RayWeightSyncScheme()
    scheme.init_on_sender(model=make_affine())
    with RayTransport(make_affine, server_kwargs={"weight_sync": scheme, "max_batch_size": 16}) as tr:
        yield scheme, tr


def test_weight_sync_from_driver_and_from_a_ray_actor(affine, callers):
    scheme, tr = affine
    client = tr.client()
    ones = TensorDict(observation=torch.ones(8))
    v0 = scheme.published_version  # 0 when this test runs first: the initial zero weights
    out = client(ones)
    before = int(out["policy_version"])
    assert before <= v0 and float(out["action"]) == 9.0 * before
    v = scheme.send(weights=const_weights(v0 + 1), wait=True)  # from the driver
    out = client(ones)
    assert v == v0 + 1 and int(out["policy_version"]) == v and float(out["action"]) == 9.0 * v
    v2 = ray.get(callers[0].push.remote(scheme, float(v0 + 2)), timeout=60)  # from a Ray actor
    out = client(ones)
    assert v2 == v0 + 2 and int(out["policy_version"]) == v2 and float(out["action"]) == 9.0 * v2
    with pytest.raises(ValueError, match="shape"):
        scheme.send(weights={"module.weight": torch.zeros(2, 8), "module.bias": torch.zeros(1)})


def test_weight_sync_is_atomic_and_versions_match_weights(affine, callers):
    """While weights change under load, every answer matches its stamped version exactly."""
    scheme, tr = affine
    client = tr.client()
    v0 = scheme.published_version
    refs = [c.call_many.remote(client, [1.0] * 40) for c in callers]
    for v in range(v0 + 1, v0 + 11):
        scheme.send(weights=const_weights(v), version=v)  # version v carries weights all equal to v
    rows = [r for rs in ray.get(refs, timeout=90) for r in rs]
    seen = set()
    for r in rows:
        v = int(r["policy_version"])
        seen.add(v)
        assert float(r["action"]) == 9.0 * v  # torn weights or a stale stamp would break this
    assert max(seen) <= v0 + 10


def test_clients_pickle_and_run_in_a_driver_thread_pool(doubler, slow, callers):
    import concurrent.futures

    client = ray.cloudpickle.loads(ray.cloudpickle.dumps(doubler.client()))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda v: client(obs(v), timeout=30), range(8)))
    assert [float(o["action"][0]) for o in outs] == [2.0 * v for v in range(8)]
    with pytest.raises(TimeoutError):
        slow.client()(obs(1), timeout=0.5)  # the slow server waits for five more requests
    # The timed-out request still sits in the server's queue: five more complete the batch,
    # they are answered, and the server stays usable.
    refs = [callers[i % 3].call.remote(slow.client(), 7) for i in range(5)]
    assert all(k == "ok" and float(td["action"][0]) == 14.0 for k, td in ray.get(refs, timeout=60))


def test_weight_sync_survives_idle_polls_and_reports_rejected_weights(monkeypatch):
    """An idle server renews its mailbox poll; weights it refuses make send(wait=True) raise."""
    import rlserve.weight_sync.ray as wsr
    from rlserve import ThreadingTransport

    monkeypatch.setattr(wsr, "_POLL_S", 0.2)  # the poll expires many times while idle
    scheme = RayWeightSyncScheme()  # no sender model: only the server can check the weights
    tt = ThreadingTransport()
    with InferenceServer(make_affine(), tt, weight_sync=scheme):
        client = tt.client()
        ones = TensorDict(observation=torch.ones(8))
        assert int(client(ones)["policy_version"]) == 0
        time.sleep(1.0)  # no requests, several expired polls
        assert scheme.send(weights=const_weights(1), wait=True, timeout=10) == 1
        out = client(ones)
        assert int(out["policy_version"]) == 1 and float(out["action"]) == 9.0
        with pytest.raises(ValueError, match="rejected weights version 2"):
            scheme.send(weights={"module.weight": torch.zeros(2, 8), "module.bias": torch.zeros(1)},
                        wait=True, timeout=10)
        out = client(ones)  # the refused weights never reached the model
        assert int(out["policy_version"]) == 1 and float(out["action"]) == 9.0
        assert scheme.send(weights=const_weights(3), wait=True, timeout=10) == 3
        assert int(client(ones)["policy_version"]) == 3


def test_output_without_batch_size_is_split_like_the_threads_path():
    """TensorDictModule(inplace=False) returns a TensorDict with batch_size=[]: still served."""
    model = TensorDictModule(Doubler(), in_keys=["observation"], out_keys=["action"], inplace=False)
    tr = RayTransport()
    with InferenceServer(model, tr, max_batch_size=4):
        out = tr.client()(obs(3), timeout=30)
        assert float(out["action"][0]) == 6.0 and int(out["policy_version"]) == 0
    tr.shutdown()


def test_driver_stall_is_not_a_permanent_death():
    """A driver that stops beating past dead_after serves again once it beats again."""
    import ctypes

    tr = RayTransport(dead_after=1.0)
    try:
        with InferenceServer(make_doubler(), tr, max_batch_size=4):
            client = tr.client()
            assert float(client(obs(1), timeout=30)["action"][0]) == 2.0
            ctypes.PyDLL(None).sleep(2)  # a C call holding the GIL: no heartbeat for 2 s,
            # so the gateway declares the driver dead; it must serve again once the driver
            # beats again (every 0.5 s). Calls racing that first beat may still see the death.
            t_end = time.monotonic() + 10
            while True:
                try:
                    out = client(obs(2), timeout=30)
                    break
                except ServerDeadError:
                    assert time.monotonic() < t_end, "still dead 10 s after the stall"
                    time.sleep(0.1)
            assert float(out["action"][0]) == 4.0
        t0 = time.monotonic()
        assert ray.get(tr.actor.take.remote(8, 0.5), timeout=30) == []  # not serving: it waits
        assert time.monotonic() - t0 >= 0.4
    finally:
        tr.shutdown()


def test_clients_after_shutdown_get_server_closed_error():
    tr = RayTransport(make_doubler)
    client = tr.client()
    assert float(client(obs(1), timeout=30)["action"][0]) == 2.0
    tr.shutdown()
    with pytest.raises(ServerClosedError):
        client(obs(1), timeout=30)
    with pytest.raises(ServerClosedError):
        client.submit(obs(1)).result(timeout=30)
    with pytest.raises(ServerClosedError):
        tr.client()
