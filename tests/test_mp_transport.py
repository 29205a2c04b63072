"""MPTransport with real actor processes: start methods, layouts, dtypes, fallbacks, backpressure."""
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.nn as nn
from tensordict import NonTensorData, TensorDict
from tensordict.nn import TensorDictModule

from rlserve import InferenceServer, MPTransport, QueueFullError, RequestError, ServerClosedError
from rlserve.bench.common import seed_policy


def _shm():
    return {f for f in os.listdir("/dev/shm") if f.startswith("rlserve_")}


@pytest.fixture(autouse=True, scope="module")
def no_shm_leftovers():
    before = _shm()
    yield
    time.sleep(0.2)
    assert _shm() - before == set(), "rlserve shared-memory segments left in /dev/shm"


class Doubler(nn.Module):
    def forward(self, x):
        return x * 2


class Slow(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        time.sleep(self.s)
        return x * 2


def doubler(sleep=0.0):
    return TensorDictModule(Slow(sleep) if sleep else Doubler(), in_keys=["observation"], out_keys=["action"])


def copy_model(td):
    """Answers every input leaf back, plus an action computed from all of them."""
    out = td.clone()
    total = sum(v.reshape(v.shape[0], -1).float().sum(-1) for v in td.values(True, True))
    out.set("action", total)
    return out


def _doubler_actor(client, n, q):
    try:
        for i in range(n):
            obs = torch.full((8,), float(i))
            out = client(TensorDict(observation=obs))
            assert torch.equal(out["action"], obs * 2), out["action"]
        q.put(("ok", os.getpid(), int(out["policy_version"])))
    except BaseException as e:
        q.put(("err", os.getpid(), repr(e)))


def _run(ctx, target, args_list, timeout=90):
    q = ctx.Queue()
    ps = [ctx.Process(target=target, args=(*a, q), daemon=True) for a in args_list]
    for p in ps:
        p.start()
    try:
        return [q.get(timeout=timeout) for _ in ps]
    finally:
        for p in ps:
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork", "torch-spawn"])
def test_start_methods_and_late_clients(method):
    """Clients made before start, after start, and after other actors spawned all get their answers."""
    if method == "torch-spawn":
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
    else:
        ctx = mp.get_context(method)
    tr = MPTransport(ctx)
    early = tr.client()  # before the server starts
    with InferenceServer(doubler(), tr, max_batch_size=16) as server:
        q = ctx.Queue()
        p1 = ctx.Process(target=_doubler_actor, args=(early, 50, q), daemon=True)
        p1.start()
        late = tr.client()  # after the server started and another actor was spawned
        p2 = ctx.Process(target=_doubler_actor, args=(late, 50, q), daemon=True)
        p2.start()
        try:
            res = [q.get(timeout=90) for _ in range(2)]
        finally:
            for p in (p1, p2):
                p.join(10)
                if p.is_alive():
                    p.kill()
        assert [r[0] for r in res] == ["ok", "ok"], res
        assert {r[1] for r in res} == {p1.pid, p2.pid}
        u = tr.usage()
        assert u["fast_requests"] >= 2 * 49, u  # one learning request per process at most
        assert u["pickled_requests"] <= 2, u
        assert server.is_alive


def _many_dtypes():
    return TensorDict(
        obs=TensorDict(pixels=torch.randint(0, 255, (3, 84, 84), dtype=torch.uint8), vec=torch.randn(5)),
        count=torch.tensor([3, -2], dtype=torch.int64),
        small=torch.tensor(7, dtype=torch.int16),
        done=torch.tensor([True, False, True]),
    )


def _dtype_actor(client, q):
    try:
        results = []
        for _ in range(20):
            td = _many_dtypes()
            out = client(td)
            for k in td.keys(True, True):
                assert out[k].dtype == td[k].dtype and torch.equal(out[k], td[k]), k
            expect = sum(v.float().sum() for v in td.values(True, True))
            assert torch.allclose(out["action"], expect), (out["action"], expect)
            results.append(True)
        q.put(("ok", len(results)))
    except BaseException as e:
        q.put(("err", repr(e)))


def test_nested_keys_many_dtypes_and_images_take_the_fast_path():
    ctx = mp.get_context("spawn")
    tr = MPTransport()
    with InferenceServer(copy_model, tr, max_batch_size=8):
        res = _run(ctx, _dtype_actor, [(tr.client(),), (tr.client(),)])
        assert res == [("ok", 20), ("ok", 20)], res
        u = tr.usage()
    # the layout was learned from the first request; everything after travelled through shm
    assert u["pickled_requests"] <= 2 and u["fast_requests"] >= 38, u
    assert u["pickled_answers"] == 0 and "pixels" in u["request_layout"], u


def test_declared_layout_and_general_path_for_misfits():
    """Declared layouts are used from the first request; misfits are pickled, never truncated."""
    tr = MPTransport(request_example=TensorDict(observation=torch.zeros(8)),
                     response_example=TensorDict(action=torch.zeros(8)))
    with InferenceServer(doubler(), tr, max_batch_size=8):
        c = tr.client()
        out = c(TensorDict(observation=torch.arange(8.0)))
        assert torch.equal(out["action"], torch.arange(8.0) * 2)
        assert set(out.keys()) == {"action", "policy_version"}  # only the declared answer travels
        assert tr.usage()["fast_requests"] == 1 and tr.usage()["pickled_requests"] == 0
        big = c(TensorDict(observation=torch.arange(20.0)))  # other shape: general path, whole answer
        assert torch.equal(big["action"], torch.arange(20.0) * 2)
        as_int = c(TensorDict(observation=torch.arange(8)))  # other dtype
        assert as_int["action"].dtype == torch.int64 and torch.equal(as_int["action"], torch.arange(8) * 2)
        extra = c(TensorDict(observation=torch.ones(8), note=NonTensorData("hello")))  # non-tensor data
        # the answer fits the declared response layout, so only its keys travel back
        assert torch.equal(extra["action"], torch.full((8,), 2.0))
        assert tr.usage()["pickled_requests"] == 3


def _bad_actor(client, q):
    try:
        client(TensorDict(observation=torch.zeros(5, dtype=torch.int32)))
        q.put(("no error", ""))
    except RequestError as e:
        q.put(("RequestError", str(e)))
    except BaseException as e:
        q.put((type(e).__name__, repr(e)))


def test_bad_input_fails_only_its_sender():
    ctx = mp.get_context("spawn")
    tr = MPTransport()
    with InferenceServer(seed_policy(), tr, max_batch_size=16) as server:
        good = tr.client()
        good(TensorDict(observation=torch.randn(8)))  # the model has accepted this layout
        q = ctx.Queue()
        p = ctx.Process(target=_bad_actor, args=(tr.client(), q), daemon=True)
        p.start()
        n = 0
        deadline = time.monotonic() + 90
        while q.empty() and time.monotonic() < deadline:  # good traffic meanwhile
            assert good(TensorDict(observation=torch.randn(8)))["action"].shape == (4,)
            n += 1
        kind, msg = q.get(timeout=5)
        p.join(10)
        assert kind == "RequestError", (kind, msg)
        assert "observation" in msg and "expected" in msg, msg
        assert good(TensorDict(observation=torch.randn(8)))["action"].shape == (4,)
        assert server.is_alive
    with pytest.raises(RequestError):
        tr.client()([1, 2, 3])


def test_backpressure_per_client():
    tr = MPTransport(max_inflight=2, block_when_full=False)
    with InferenceServer(doubler(sleep=0.3), tr, max_batch_size=1):
        c = tr.client()
        f1 = c.submit(TensorDict(observation=torch.ones(8)))
        f2 = c.submit(TensorDict(observation=torch.ones(8)))
        with pytest.raises(QueueFullError, match="max_inflight"):
            c.submit(TensorDict(observation=torch.ones(8)))
        assert torch.equal(f1.result(10)["action"], torch.full((8,), 2.0))
        f2.result(10)
        c.submit(TensorDict(observation=torch.ones(8))).result(10)  # room again
    blocking = MPTransport(max_inflight=1)
    with InferenceServer(doubler(sleep=0.2), blocking, max_batch_size=1):
        c = blocking.client()
        f1 = c.submit(TensorDict(observation=torch.ones(8)))
        t0 = time.monotonic()
        f2 = c.submit(TensorDict(observation=torch.ones(8)))  # waits for f1's slot
        assert f1.done() and time.monotonic() - t0 > 0.05
        assert f2.result(10)["action"].shape == (8,)


def _register_actor(client, q):
    try:
        client(TensorDict(observation=torch.ones(8)))
        q.put(("ok", ""))
    except QueueFullError as e:
        q.put(("QueueFullError", str(e)))
    except BaseException as e:
        q.put((type(e).__name__, repr(e)))


def test_max_clients_bound_is_clear():
    ctx = mp.get_context("spawn")
    tr = MPTransport(max_clients=1)
    with InferenceServer(doubler(), tr):
        c = tr.client()
        c(TensorDict(observation=torch.ones(8)))  # takes the only place
        (kind, msg), = _run(ctx, _register_actor, [(tr.client(),)])
        assert kind == "QueueFullError" and "max_clients" in msg, (kind, msg)
        c.close()  # gives the place back
        deadline = time.monotonic() + 5
        while tr.usage()["clients"] and time.monotonic() < deadline:
            time.sleep(0.05)
        (kind, msg), = _run(ctx, _register_actor, [(tr.client(),)])
        assert kind == "ok", (kind, msg)


def test_shutdown_answers_closed_and_unlinks():
    tr = MPTransport()
    server = InferenceServer(doubler(), tr).start()
    c = tr.client()
    c(TensorDict(observation=torch.ones(8)))
    names = set(f for f in _shm() if tr.token in f)
    assert len(names) == 2  # request and answer banks
    server.shutdown()
    assert not any(tr.token in f for f in _shm())
    with pytest.raises(ServerClosedError):
        c(TensorDict(observation=torch.ones(8)), timeout=5)
