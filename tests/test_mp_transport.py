"""MPTransport with real actor processes: start methods, layouts, dtypes, fallbacks, backpressure."""
import multiprocessing as mp
import os
import threading
import time

import pytest
import torch
from tensordict import NonTensorData, TensorDict
from tensordict.nn import TensorDictModule

from rlserve import InferenceServer, MPTransport, QueueFullError, RequestError, ServerClosedError
from helpers import Doubler, Slow, seed_policy
from helpers import rlserve_shm as _shm


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
    ctx = mp.get_context("fork")  # start methods are covered above; fork keeps this fast
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
    ctx = mp.get_context("fork")  # (start methods are covered above)
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
    # a clean shutdown is "closed", never "dead" (ServerDeadError subclasses ServerClosedError)
    for _ in range(2):
        with pytest.raises(ServerClosedError) as e:
            c(TensorDict(observation=torch.ones(8)), timeout=5)
        assert type(e.value) is ServerClosedError, repr(e.value)
    with pytest.raises(ServerClosedError) as e:
        tr.client()(TensorDict(observation=torch.ones(8)), timeout=5)  # never registered
    assert type(e.value) is ServerClosedError, repr(e.value)
    # the same transport served again: the old client registers anew
    with InferenceServer(doubler(), tr):
        assert torch.equal(c(TensorDict(observation=torch.ones(8)), timeout=5)["action"], torch.full((8,), 2.0))
    assert not any(tr.token in f for f in _shm())


def test_call_while_a_future_is_pending_with_a_slow_model():
    """client(td) while a submit() future waits: both answers arrive (the wait outlasts the liveness period)."""
    tr = MPTransport()
    with InferenceServer(doubler(sleep=0.5), tr, max_batch_size=1):
        c = tr.client()
        fut = c.submit(TensorDict(observation=torch.full((8,), 1.0)))
        out = c(TensorDict(observation=torch.full((8,), 2.0)), timeout=20)
        assert torch.equal(out["action"], torch.full((8,), 4.0))
        assert torch.equal(fut.result(20)["action"], torch.full((8,), 2.0))


def test_retry_after_a_failed_registration():
    """A client whose registration failed (no server yet, or refused) registers on its next call."""
    tr = MPTransport()
    c = tr.client()
    with pytest.raises(TimeoutError, match="not started yet"):  # a call before start waits for the server
        c(TensorDict(observation=torch.ones(8)), timeout=0.5)
    with InferenceServer(doubler(), tr):
        assert torch.equal(c(TensorDict(observation=torch.ones(8)), timeout=10)["action"], torch.full((8,), 2.0))
    for bwf in (True, False):
        tr = MPTransport(max_clients=1, block_when_full=bwf)
        with InferenceServer(doubler(), tr):
            a, b = tr.client(), tr.client()  # each client object registers on its own
            a(TensorDict(observation=torch.ones(8)))
            with pytest.raises(QueueFullError, match="max_clients"):
                b(TensorDict(observation=torch.ones(8)), timeout=5)
            a.close()  # gives the only place back
            out = b(TensorDict(observation=torch.ones(8)), timeout=10)
            assert torch.equal(out["action"], torch.full((8,), 2.0))


def test_use_after_close_registers_again():
    tr = MPTransport(max_clients=1)
    with InferenceServer(doubler(), tr):
        c = tr.client()
        c(TensorDict(observation=torch.ones(8)))
        c.close()
        c.close()  # idempotent
        assert torch.equal(c(TensorDict(observation=torch.ones(8)), timeout=10)["action"], torch.full((8,), 2.0))
        assert tr.usage()["clients"] == 1  # the closed registration was given back (max_clients=1)


def test_answers_are_copies_not_views_of_shared_memory():
    """An answer stays as it was after later requests reuse its slot, and owns its memory."""
    tr = MPTransport(max_inflight=1)
    with InferenceServer(doubler(), tr, max_batch_size=4):
        c = tr.client()
        c(TensorDict(observation=torch.zeros(8)))  # learns the layouts
        first = c(TensorDict(observation=torch.full((8,), 1.0)))
        fut = c.submit(TensorDict(observation=torch.full((8,), 2.0)))
        second = fut.result(10)
        third = c(TensorDict(observation=torch.full((8,), 3.0)))  # same (only) slot again
        assert tr.usage()["fast_answers"] >= 3
        assert torch.equal(first["action"], torch.full((8,), 2.0))
        assert torch.equal(second["action"], torch.full((8,), 4.0))
        assert torch.equal(third["action"], torch.full((8,), 6.0))
        bank = c._reg.resp_bank  # white-box: where the shared answer rows live
        lo = min(t.data_ptr() for t in bank.tensors)
        hi = max(t.data_ptr() + t.numel() * t.element_size() for t in bank.tensors)
        for out in (first, second, third):
            for v in out.values(True, True):
                assert not lo <= v.data_ptr() < hi, "an answer aliases the shared-memory bank"
        first["action"].add_(100)  # writing into an answer touches nothing shared
        assert torch.equal(c(TensorDict(observation=torch.full((8,), 3.0)))["action"], torch.full((8,), 6.0))


def test_policy_version_on_fast_and_pickled_answers():
    tr = MPTransport()
    with InferenceServer(seed_policy(), tr, max_batch_size=4) as server:
        c = tr.client()
        c(TensorDict(observation=torch.ones(8)))
        server.update_weights(seed_policy().state_dict(), version=7)
        fast = c(TensorDict(observation=torch.ones(8)))
        pickled = c(TensorDict(observation=torch.ones(8), extra=torch.zeros(3)))  # misfit: general path both ways
        u = tr.usage()
        assert u["pickled_answers"] >= 1 and u["fast_answers"] >= 1, u
        assert int(fast["policy_version"]) == 7 and int(pickled["policy_version"]) == 7
        assert "extra" in pickled.keys()


def test_threads_sharing_one_client_each_get_their_own_answers():
    """Threads racing for a client's few slots never get another thread's answer, nor lose one."""
    tr = MPTransport(max_inflight=2)
    with InferenceServer(doubler(), tr, max_batch_size=8):
        c = tr.client()
        errors = []

        def worker(k):
            try:
                for i in range(40):
                    v = float(k * 1000 + i)
                    if i % 3 == 0:
                        out = c.submit(TensorDict(observation=torch.full((8,), v))).result(20)
                    else:
                        out = c(TensorDict(observation=torch.full((8,), v)), timeout=20)
                    assert torch.equal(out["action"], torch.full((8,), 2 * v)), (k, i, out["action"][0])
            except BaseException as e:
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts) and errors == [], errors


def test_spin_wait_answers_correctly_and_stops_when_idle():
    with pytest.raises(ValueError, match="spin_us"):
        MPTransport(spin_us=-1)
    policy = seed_policy()
    tr = MPTransport(spin_us=100_000)  # 0.1 s: long enough to show in CPU time if it never ended
    with InferenceServer(policy, tr, max_batch_size=8):
        client = tr.client()
        for _ in range(50):
            td = TensorDict(observation=torch.randn(8))
            out = client(td)
            with torch.no_grad():
                torch.testing.assert_close(out["action"], policy(td.clone())["action"])
        assert tr.usage()["spin_hits"] > 0  # the next request came while it polled
        time.sleep(0.2)  # the spin window after the last answer has passed
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(1.0)
        idle_cpu = time.process_time() - cpu0
    assert idle_cpu < 0.3, f"an idle server kept spinning: {idle_cpu:.2f} s CPU in {time.monotonic() - wall0:.2f} s"


def test_no_spin_by_default_in_process_but_in_a_process_server():
    from rlserve import ProcessServer

    tr = MPTransport()
    with InferenceServer(seed_policy(), tr, max_batch_size=8):
        client = tr.client()
        for _ in range(20):
            client(TensorDict(observation=torch.randn(8)))
        assert tr.usage()["spin_hits"] == 0  # shares its process (and GIL) with other work
    with ProcessServer(seed_policy, max_batch_size=8) as ps:
        client = ps.client()
        for _ in range(100):
            client(TensorDict(observation=torch.randn(8)))
        assert ps.stats()["transport"]["spin_hits"] > 0  # a process of its own spins a little


@pytest.mark.parametrize("learn_layout", [True, False], ids=["fast-answers", "pickled-answers"])
def test_spin_window_starts_after_the_answer_whatever_its_path(learn_layout):
    """The window is measured from the answer, so a forward longer than spin_us still spins after it."""
    tr = MPTransport(spin_us=50_000, learn_layout=learn_layout)  # 50 ms window
    with InferenceServer(doubler(sleep=0.1), tr, max_batch_size=8):  # 100 ms forward: longer than the window
        client = tr.client()
        for _ in range(4):
            out = client(TensorDict(observation=torch.ones(8)), timeout=30)
            assert torch.equal(out["action"], torch.full((8,), 2.0))
        usage = tr.usage()
    assert usage["pickled_answers" if not learn_layout else "fast_answers"] > 0  # the path under test
    assert usage["spin_hits"] > 0, usage  # the next request came within 50 ms of each answer


def test_spin_counts_against_the_wait_timeout():
    """A spin that finds nothing is part of the wait: min_batch_size's timeout is not doubled."""
    tr = MPTransport(spin_us=5_000_000)  # a window longer than the batching timeout
    with InferenceServer(doubler(), tr, max_batch_size=8, min_batch_size=2, timeout=0.5):
        client = tr.client()
        client(TensorDict(observation=torch.ones(8)), timeout=30)  # registers the client
        t0 = time.monotonic()
        out = client(TensorDict(observation=torch.ones(8)), timeout=30)  # alone: runs at the timeout
        took = time.monotonic() - t0
    assert torch.equal(out["action"], torch.full((8,), 2.0))
    assert 0.45 < took < 0.8, f"a lone request waited {took:.2f} s for a 0.5 s batching timeout"
