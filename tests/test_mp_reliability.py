"""Crashes with real processes: SIGKILLed actors, a dying server process, ProcessServer lifecycle."""
import functools
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from rlserve import InferenceServer, MPTransport, ProcessServer, ServerClosedError, ServerDeadError
from rlserve.bench.common import seed_policy


def _shm():
    return {f for f in os.listdir("/dev/shm") if f.startswith("rlserve_")}


@pytest.fixture(autouse=True, scope="module")
def no_shm_leftovers():
    before = _shm()
    yield
    time.sleep(0.2)
    assert _shm() - before == set(), "rlserve shared-memory segments left in /dev/shm"


class Slow(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        time.sleep(self.s)
        return x * 2


def slow_doubler(sleep):
    return TensorDictModule(Slow(sleep), in_keys=["observation"], out_keys=["action"])


def _loop_actor(client, q):
    q.put(("started", os.getpid()))
    try:
        while True:
            client(TensorDict(observation=torch.ones(8)))
            q.put(("answer", os.getpid()))
    except BaseException as e:
        q.put(("err", repr(e)))


def _one_call(client, q):
    try:
        out = client(TensorDict(observation=torch.ones(8)), timeout=60)
        q.put(("ok", float(out["action"].sum())))
    except BaseException as e:
        q.put((type(e).__name__, repr(e)))


def test_sigkilled_actor_gives_its_slots_back():
    ctx = mp.get_context("spawn")
    tr = MPTransport(max_clients=2)
    with InferenceServer(slow_doubler(0.3), tr, max_batch_size=4) as server:
        q = ctx.Queue()
        victim = ctx.Process(target=_loop_actor, args=(tr.client(), q), daemon=True)
        victim.start()
        assert q.get(timeout=60)[0] == "started"
        assert q.get(timeout=60)[0] == "answer"  # registered and looping: a request is in flight now
        time.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        deadline = time.monotonic() + 10
        while tr.usage()["clients"] and time.monotonic() < deadline:
            time.sleep(0.05)
        u = tr.usage()
        assert u["clients"] == 0 and u["free_client_places"] == 2 and u["inflight"] == 0, u
        # both places are usable again, by two new processes at once
        q2 = ctx.Queue()
        ps = [ctx.Process(target=_one_call, args=(tr.client(), q2), daemon=True) for _ in range(2)]
        for p in ps:
            p.start()
        res = [q2.get(timeout=60) for _ in ps]
        for p in ps:
            p.join(10)
        assert res == [("ok", 16.0), ("ok", 16.0)], res
        assert server.is_alive


def _announced_call(client, q):
    q.put(("calling", os.getpid()))
    _one_call(client, q)


def test_dead_server_process_fails_every_waiting_client_fast():
    ctx = mp.get_context("spawn")
    ps = ProcessServer(functools.partial(slow_doubler, 120.0), max_batch_size=1).start()
    try:
        token = ps.transport.token
        q = ctx.Queue()
        actors = [ctx.Process(target=_announced_call, args=(ps.client(), q), daemon=True) for _ in range(2)]
        for p in actors:
            p.start()
        main_client = ps.client()
        # the first request creates the banks, then sits in a long forward (the process is killed during it); the others queue behind it
        fut = main_client.submit(TensorDict(observation=torch.ones(8)))
        assert [q.get(timeout=60)[0] for _ in actors] == ["calling"] * 2
        time.sleep(2.0)  # their requests (or registrations) now wait on the busy server
        os.kill(ps.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServerDeadError):
            fut.result(timeout=10)
        assert time.monotonic() - t0 < 3.0
        res = [q.get(timeout=10) for _ in actors]
        assert [r[0] for r in res] == ["ServerDeadError"] * 2, res
        assert time.monotonic() - t0 < 4.0
        for p in actors:
            p.join(10)
        assert not ps.is_alive
        with pytest.raises(ServerDeadError):
            ps.stats()
    finally:
        ps.shutdown()
    assert not any(token in f for f in _shm())


def _weights_actor(client, q):
    out = client(TensorDict(observation=torch.ones(8)), timeout=60)
    q.put((out["action"].tolist(), int(out["policy_version"])))


def test_process_server_lifecycle_and_weights():
    ctx = mp.get_context("spawn")
    with ProcessServer(seed_policy, max_batch_size=8) as ps:
        assert ps.is_alive and ps.pid != os.getpid()
        c = ps.client()
        ref = seed_policy()
        obs = torch.ones(8)
        out = c(TensorDict(observation=obs))
        assert torch.allclose(out["action"], ref(TensorDict(observation=obs))["action"], atol=1e-6)
        sd = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
        ps.update_weights(sd, version=5)
        out = c(TensorDict(observation=obs))
        assert torch.equal(out["action"], torch.zeros(4)) and int(out["policy_version"]) == 5
        q = ctx.Queue()
        p = ctx.Process(target=_weights_actor, args=(c, q), daemon=True)
        p.start()
        assert q.get(timeout=60) == ([0.0] * 4, 5)
        p.join(10)
        s = ps.stats()
        assert s["requests"] >= 3 and s["transport"]["fast_requests"] >= 2
        token = ps.transport.token
    assert not ps.is_alive
    with pytest.raises(ServerClosedError):
        c(TensorDict(observation=obs), timeout=5)
    assert not any(token in f for f in _shm())
