"""Crashes with real processes: SIGKILLed actors, a dying server process, ProcessServer lifecycle."""
import functools
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from rlserve import InferenceServer, MPTransport, ProcessServer, ServerClosedError, ServerDeadError
from helpers import rlserve_shm as _shm
from helpers import seed_policy, slow_doubler, track_token


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
    ctx = mp.get_context("fork")  # cheap to start; spawn is covered elsewhere
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
        with pytest.raises(ServerDeadError):
            main_client(TensorDict(observation=torch.ones(8)), timeout=10)
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
    with pytest.raises(ServerClosedError) as e:
        c(TensorDict(observation=obs), timeout=5)
    assert type(e.value) is ServerClosedError, repr(e.value)  # a clean shutdown, not a death
    assert not any(token in f for f in _shm())


# -- processes made with fork, and requests left unread --------------------------------------------

_busy = {}  # threading.Event per process: set when the model starts a long forward


class SlowOnNegative(nn.Module):
    """x * 2; sleeps ``s`` seconds first when any input is negative (to keep the server busy)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        if (x < 0).any():
            _busy.setdefault(os.getpid(), threading.Event()).set()
            time.sleep(self.s)
        return x * 2


def slow_on_negative(s):
    return TensorDictModule(SlowOnNegative(s), in_keys=["observation"], out_keys=["action"])


def _td(v, n=8):
    return TensorDict(observation=torch.full((n,), float(v)))


def _wait_busy(timeout=10.0):
    assert _busy.setdefault(os.getpid(), threading.Event()).wait(timeout), "the model never started its slow forward"
    _busy.pop(os.getpid())


def _doomed_actor(client, go, ready):
    client(_td(5))
    ready.set()
    go.wait(30)
    client.submit(_td(100))  # queued at the busy server, then this process dies
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)


def test_unread_request_of_a_killed_actor_never_reaches_the_next_owner_of_its_place():
    """A SIGKILLed actor's queued request is dropped, not answered to the client that gets its slots."""
    ctx = mp.get_context("fork")
    tr = MPTransport(max_clients=3)
    with InferenceServer(slow_on_negative(2.0), tr, max_batch_size=1) as server:
        c = tr.client()
        c(_td(1))  # learns the layouts: every later request takes the fast path
        go, ready = ctx.Event(), ctx.Event()
        doomed = ctx.Process(target=_doomed_actor, args=(tr.client(), go, ready), daemon=True)
        doomed.start()
        assert ready.wait(30)
        busy = threading.Thread(target=lambda: c(_td(-1), timeout=30))
        busy.start()
        _wait_busy()  # the server is in a 2 s forward: nothing it receives is read meanwhile
        owner, got = tr.client(), []
        t = threading.Thread(target=lambda: got.extend(float(owner(_td(3), timeout=30)["action"][0]) for _ in range(2)))
        t.start()
        try:
            time.sleep(0.5)  # its registration now waits in the server's queue (busy 2 s), ahead of the doomed request
            go.set()
            doomed.join(10)  # dead (and reaped) while the server is still busy: its place is freed first
            t.join(30)
            assert got == [6.0, 6.0], got  # 200.0 would be the dead actor's answer
        finally:
            busy.join(30)
            if doomed.is_alive():
                doomed.kill()
        deadline = time.monotonic() + 5
        while tr.usage()["clients"] > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        u = tr.usage()
        assert u["clients"] == 2 and u["inflight"] == 0, u  # the dead actor's place was given back
        assert server.is_alive


def _big_then_die(client, sent):
    client.submit(_td(-1, n=20_000))  # pickled both ways (>48 KB: one-shot files), slow forward
    sent.set()
    time.sleep(30)


def test_large_answer_to_a_killed_actor_is_not_left_in_shm():
    """The one-shot file of an answer whose reader died is removed at once, not at shutdown."""
    ctx = mp.get_context("fork")
    tr = MPTransport()
    with InferenceServer(slow_on_negative(1.0), tr, max_batch_size=1):
        main = tr.client()
        main(_td(1))  # learns an 8-float layout: the 20k-float request and answer do not fit it
        sent = ctx.Event()
        p = ctx.Process(target=_big_then_die, args=(tr.client(), sent), daemon=True)
        p.start()
        try:
            assert sent.wait(30)
            _wait_busy()  # its request was read; the answer comes after the 1 s forward
            p.kill()
            p.join(10)
            deadline = time.monotonic() + 10
            while (tr.usage()["clients"] > 1 or tr.usage()["inflight"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            u = tr.usage()
            assert u["clients"] == 1 and u["inflight"] == 0, u  # answered (or failed) and dropped
            left = [f for f in _shm() if tr.token in f and "_m_" in f]
            assert left == [], left  # while the server still runs
            assert torch.equal(main(_td(2))["action"], torch.full((8,), 4.0))
        finally:
            if p.is_alive():
                p.kill()


def _fork_actor(client, q, ready, go):
    client(_td(1), timeout=30)  # registered while the server is idle
    ready.set()
    go.wait(30)  # the server is busy now: this call waits for its answer
    q.put(("calling", os.getpid()))
    t0 = time.monotonic()
    try:
        client(_td(2), timeout=60)
        q.put(("answer", 0.0))
    except BaseException as e:
        q.put((type(e).__name__, time.monotonic() - t0))


def _serving_host(q):
    """Serve in this process, fork an actor, then keep the server busy until killed."""
    tr = MPTransport()
    InferenceServer(slow_on_negative(60.0), tr, max_batch_size=1).start()
    c = tr.client()
    c(_td(1))
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    actor = ctx.Process(target=_fork_actor, args=(tr.client(), q, ready, go))
    actor.start()
    ready.wait(30)
    c.submit(_td(-1))  # a 60 s forward
    _wait_busy()
    go.set()  # only now: a request sent earlier could be answered before the slow one
    q.put(("host", actor.pid, tr.token))
    time.sleep(120)


def test_fork_children_of_a_killed_serving_process_fail_fast():
    """Children forked by a process serving in-process do not keep its socket alive after it is killed."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    host = ctx.Process(target=_serving_host, args=(q,))  # not a daemon: it forks an actor
    host.start()
    actor_pid = None
    try:
        msgs = [q.get(timeout=30) for _ in range(2)]
        (_, actor_pid, token), = [m for m in msgs if m[0] == "host"]
        time.sleep(0.3)  # the actor now waits for its answer
        os.kill(host.pid, signal.SIGKILL)
        host.join(10)
        kind, waited = q.get(timeout=10)
        assert kind == "ServerDeadError", (kind, waited)
    finally:
        if host.is_alive():
            host.kill()
        if actor_pid is not None:
            try:
                os.kill(actor_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(token in f for f in _shm()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(token in f for f in _shm())


def _quiet_host(q):
    tr = MPTransport()
    InferenceServer(slow_on_negative(60.0), tr, max_batch_size=1).start()
    q.put(tr.token)
    time.sleep(120)


def test_files_of_large_requests_are_removed_when_the_server_process_dies():
    """A >48 KB pickled request waits in a one-shot /dev/shm file; a dead server cannot remove it, its sender does."""
    from rlserve.transports.mp import MPClient

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    host = ctx.Process(target=_quiet_host, args=(q,), daemon=True)
    host.start()
    try:
        token = q.get(timeout=30)
        track_token(token)  # the transport was made in the server process
        c = MPClient({"token": token, "block_when_full": True})
        c(_td(1), timeout=30)
        busy = c.submit(_td(-1))
        time.sleep(0.5)  # the server is in its 60 s forward
        big = c.submit(TensorDict(big=torch.randn(50_000)))  # fits no layout: pickled, through a file
        assert any(token in f and "_m_" in f for f in _shm())
        os.kill(host.pid, signal.SIGKILL)
        host.join(10)
        for fut in (busy, big):
            with pytest.raises(ServerDeadError):
                fut.result(timeout=10)
    finally:
        if host.is_alive():
            host.kill()
    deadline = time.monotonic() + 5
    while any(token in f for f in _shm()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(token in f for f in _shm()), [f for f in _shm() if token in f]


def _late_fork_child(tr, go, again, q):
    go.wait(30)
    t0 = time.monotonic()
    try:
        tr.client()(_td(1), timeout=5)
        q.put(("answer", 0.0))
    except BaseException as e:
        q.put((type(e).__name__, time.monotonic() - t0))
    again.wait(30)
    try:
        q.put(("answer", float(tr.client()(_td(1), timeout=10)["action"][0])))
    except BaseException as e:
        q.put((type(e).__name__, repr(e)))


def test_fork_child_after_clean_shutdown_and_restart():
    """A child forked while the server ran neither keeps its socket bound nor blocks its own new clients."""
    ctx = mp.get_context("fork")
    tr = MPTransport()
    go, again, q = ctx.Event(), ctx.Event(), ctx.Queue()
    server = InferenceServer(slow_on_negative(1.0), tr).start()
    tr.client()(_td(1))
    child = ctx.Process(target=_late_fork_child, args=(tr, go, again, q), daemon=True)
    child.start()
    try:
        server.shutdown()
        go.set()
        kind, waited = q.get(timeout=10)
        assert kind == "ServerClosedError", (kind, waited)  # at once, and "closed", not "dead"
        with InferenceServer(slow_on_negative(1.0), tr):  # the address is free again
            again.set()
            assert q.get(timeout=15) == ("answer", 2.0)
    finally:
        go.set()
        again.set()
        child.join(10)
        if child.is_alive():
            child.kill()
