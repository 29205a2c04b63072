"""MonarchTransport on a real Monarch process mesh (torchmonarch 0.7, actor API only)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensordict import TensorDict

# Monarch children import actor classes by module name: let them find this file.
_here = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH", "")) if p)
pytest.importorskip("monarch.actor")
from monarch.actor import Actor, endpoint, this_host  # noqa: E402

from rlserve import InferenceServer, MonarchTransport, RequestError, ServerClosedError, ServerDeadError  # noqa: E402
from helpers import seed_policy  # noqa: E402
from remote_probes import check_idle_batches_run_on_the_calling_thread, exit_payload, slow_thread_probe  # noqa: E402


def obs(v, n=8):
    return TensorDict(observation=torch.full((n,), float(v)))


class Caller(Actor):
    """A Monarch actor holding a client, used like any rlserve actor."""

    def __init__(self, client):
        self.client = client

    @endpoint
    def call(self, v, n=8):
        try:
            out = self.client(obs(v, n), timeout=30)
            return ("ok", out["action"].tolist(), int(out["policy_version"]))
        except Exception as e:
            return ("err", type(e).__name__, str(e))

    @endpoint
    def values(self, seconds, key):
        out, t_end = [], time.monotonic() + seconds
        while time.monotonic() < t_end:
            out.append(float(self.client(obs(1), timeout=30)[key]))
        return out

    @endpoint
    def loop(self, seconds):
        n, t_end = 0, time.monotonic() + seconds
        while time.monotonic() < t_end:
            try:
                self.client(obs(1), timeout=30)
                n += 1
            except Exception as e:
                return n, type(e).__name__, str(e)
        return n, None, ""


@pytest.fixture(scope="module")
def mesh():
    procs = this_host().spawn_procs(per_host={"procs": 4})
    yield procs
    procs.stop().get()


def test_import_without_monarch_names_the_extra():
    code = ("import sys; sys.modules['monarch'] = None; sys.modules['monarch.actor'] = None\n"
            "import rlserve\n"
            "try:\n    rlserve.MonarchTransport()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'rlserve[monarch]'" in out.stdout, out.stderr


def test_hosted_server_serves_a_mesh_concurrently(mesh):
    expected = seed_policy()
    with MonarchTransport(seed_policy, server_kwargs={"max_batch_size": 8}) as tr:
        callers = mesh.spawn("callers_a", Caller, tr.client())
        for _ in range(3):  # four processes call at once, several rounds
            res = list(callers.call.call(2.0).get(timeout=60).values())
            assert all(r[0] == "ok" and r[2] == 0 for r in res), res
            want = expected(obs(2.0))["action"]
            for r in res:
                assert torch.allclose(torch.tensor(r[1]), want, atol=1e-6)
        s = tr.stats()
        assert s["requests"] == 12 and s["batches"] <= 12
        # the driver's own client and submit()
        f = tr.client().submit(obs(1.0))
        assert torch.allclose(f.result(timeout=30)["action"], expected(obs(1.0))["action"], atol=1e-6)


def test_driver_hosted_server(mesh):
    tr = MonarchTransport()
    try:
        callers = mesh.spawn("callers_b", Caller, tr.client())
        early = callers.call.call(1.0)  # before start: these wait for the server (as with torchrl)
        time.sleep(1.0)
        with InferenceServer(seed_policy(), tr, max_batch_size=8) as server:
            res = list(early.get(timeout=60).values())
            assert all(r[0] == "ok" for r in res), res
            res = list(callers.call.call(1.0).get(timeout=60).values())
            assert all(r[0] == "ok" for r in res), res
            assert server.stats()["requests"] == 8
        with pytest.raises(ServerClosedError):
            tr.client()(obs(1), timeout=10)
    finally:
        tr.shutdown()


def test_bad_input_fails_only_its_sender(mesh):
    with MonarchTransport(seed_policy, server_kwargs={"max_batch_size": 8}) as tr:
        client = tr.client()
        assert client(obs(1))["action"].shape == (4,)
        callers = mesh.spawn("callers_c", Caller, client)
        one = callers.slice(procs=0)
        bad = one.call.call_one(1.0, 5)  # wrong observation width from one actor
        good = callers.slice(procs=1).call.call_one(1.0)
        r_bad, r_good = bad.get(timeout=60), good.get(timeout=60)
        assert r_bad[0] == "err" and r_bad[1] == "RequestError" and "observation" in r_bad[2]
        assert r_good[0] == "ok"
        with pytest.raises(RequestError):
            client([1, 2, 3])
        assert tr.actor.infer.call_one("garbage").get(timeout=30)[0] == "err"
        assert client(obs(3))["action"].shape == (4,)  # still serving


def test_killed_server_gives_clear_error_fast(mesh):
    tr = MonarchTransport(seed_policy)
    client = tr.client()
    callers = mesh.spawn("callers_d", Caller, client)
    loop = callers.slice(procs=0).loop.call_one(60)
    time.sleep(1.0)
    os.kill(tr.actor.pid.call_one().get(timeout=30), signal.SIGKILL)
    t0 = time.monotonic()
    n, err, msg = loop.get(timeout=60)
    assert n > 0 and err == "ServerDeadError", (n, err, msg)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ServerDeadError):
        client(obs(1), timeout=30)
    tr.shutdown()


def test_killed_client_process_harms_nothing():
    victim_procs = this_host().spawn_procs(per_host={"procs": 1})
    with MonarchTransport(seed_policy) as tr:
        client = tr.client()
        victim = victim_procs.spawn("victim", Caller, client)
        assert victim.call.call_one(1.0).get(timeout=60)[0] == "ok"
        victim.loop.call_one(30)  # busy when it dies; never awaited
        time.sleep(0.5)
        pid = victim_procs.spawn("pidder", _Pid).pid.call_one().get(timeout=30)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        for v in range(5):
            assert client(obs(v), timeout=30)["action"].shape == (4,)
        assert tr.stats()["errors"] == 0


class _Pid(Actor):
    @endpoint
    def pid(self):
        return os.getpid()


def make_affine():
    """action = c * (sum(obs) + 1) when every parameter equals c (c = 0 at start)."""
    lin = torch.nn.Linear(8, 1)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    from tensordict.nn import TensorDictModule

    return TensorDictModule(lin, in_keys=["observation"], out_keys=["action"])


def const_weights(c: float) -> dict:
    return {"module.weight": torch.full((1, 8), float(c)), "module.bias": torch.full((1,), float(c))}


def test_update_weights_reaches_the_hosted_server(mesh):
    with MonarchTransport(make_affine, server_kwargs={"max_batch_size": 8}) as tr:
        callers = mesh.spawn("callers_w", Caller, tr.client())
        res = list(callers.call.call(1.0).get(timeout=60).values())  # before: version 0, zero weights
        assert all(r[0] == "ok" and r[2] == 0 and r[1] == [0.0] for r in res), res
        assert tr.update_weights(const_weights(1.0)) == 1
        res = list(callers.call.call(1.0).get(timeout=60).values())  # after: the new version and weights
        assert all(r[0] == "ok" and r[2] == 1 and r[1] == [9.0] for r in res), res
        assert tr.update_weights(const_weights(3.0), version=7) == 7
        out = tr.client()(obs(1.0), timeout=30)
        assert int(out["policy_version"]) == 7 and float(out["action"]) == 27.0
        with pytest.raises(ValueError, match="shape"):  # refused; the old weights keep serving
            tr.update_weights({"module.weight": torch.zeros(2, 8), "module.bias": torch.zeros(1)})
        res = list(callers.call.call(1.0).get(timeout=60).values())
        assert all(r[0] == "ok" and r[2] == 7 and r[1] == [27.0] for r in res), res
        assert tr.stats()["policy_version"] == 7


class _Bomb:
    """Pickles fine, but unpickling it raises ZeroDivisionError on the receiving side."""

    def __reduce__(self):
        import operator

        return (operator.truediv, (1, 0))


class _LockPolicy:
    """Answers carry a non-picklable entry (e.g. a handle) besides the action."""

    def __call__(self, td):
        import threading

        td.set("action", td["observation"] * 2)
        td.set_non_tensor("handle", threading.Lock())
        return td


def test_unsendable_answers_and_undecodable_requests_fail_only_their_caller():
    tr = MonarchTransport()
    try:
        with InferenceServer(_LockPolicy(), tr, max_batch_size=4):
            client = tr.client()
            t0 = time.monotonic()
            with pytest.raises(RuntimeError, match="could not send its answer"):  # not a hang
                client(obs(1), timeout=20)
            assert time.monotonic() - t0 < 15
            with pytest.raises(RuntimeError, match="could not send its answer"):  # still serving
                client(obs(2), timeout=20)
    finally:
        tr.shutdown()


def test_request_that_fails_to_unpickle_is_the_callers_error_not_a_dead_server():
    from tensordict import NonTensorData

    tr = MonarchTransport()
    try:
        with InferenceServer(seed_policy(), tr, max_batch_size=4):
            client = tr.client()
            bad = TensorDict(observation=torch.ones(8), extra=NonTensorData(_Bomb()))
            with pytest.raises(Exception) as ei:
                client(bad, timeout=20)
            assert not isinstance(ei.value, ServerDeadError), ei.value
            assert isinstance(ei.value, (ZeroDivisionError, RequestError)), repr(ei.value)
            assert client(obs(2), timeout=20)["action"].shape == (4,)  # still serving
    finally:
        tr.shutdown()


def _exploding_factory():
    raise ValueError("factory exploded")


def test_failing_policy_factory_raises_and_leaves_no_process():
    def children():
        out = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
        return set(out.stdout.split())

    before = children()
    with pytest.raises(RuntimeError, match="policy_factory failed") as ei:
        MonarchTransport(_exploding_factory)
    assert ei.value.__cause__ is not None and "factory exploded" in str(ei.value)
    t_end = time.monotonic() + 10
    while children() - before and time.monotonic() < t_end:
        time.sleep(0.2)
    assert not children() - before


def test_an_idle_server_runs_the_batch_on_the_endpoint_thread():
    check_idle_batches_run_on_the_calling_thread(MonarchTransport)


class _Exit(torch.nn.Module):
    def forward(self, obs):
        raise SystemExit("the model asked to stop")


def _exit_policy():
    from tensordict.nn import TensorDictModule

    return TensorDictModule(_Exit(), in_keys=["observation"], out_keys=["action"])


def test_a_batch_that_stops_the_server_on_the_endpoint_thread_leaves_the_actor_answering():
    with MonarchTransport(_exit_policy) as tr:
        client = tr.client()
        with pytest.raises((SystemExit, ServerDeadError)):
            client(obs(1), timeout=30)
        with pytest.raises(ServerDeadError):  # later calls: a clear error at once, not a hang
            client(obs(1), timeout=30)
        assert tr.stats(timeout=30)["errors"] == 1  # the actor itself lives on and still answers


def test_a_slow_model_is_batched_on_the_server_thread(mesh):
    # Monarch runs the endpoint's calls one at a time: a 5 ms batch run there would keep the
    # next requests waiting in the mailbox, each then getting a forward of its own. Once a
    # forward has shown it is slow, batches run on the server thread, where they can grow.
    with MonarchTransport(slow_thread_probe) as tr:
        callers = mesh.spawn("slow_callers", Caller, tr.client())
        on_server = [v for part in callers.values.call(1.5, "on_server").get(timeout=120).values() for v in part]
        s = tr.stats(timeout=30)
    assert on_server.count(0.0) <= 1, on_server.count(0.0)  # at most the very first request
    assert s["mean_batch_size"] > 1.5, s["mean_batch_size"]


def test_a_request_raising_systemexit_while_decoded_is_answered_not_left_hanging():
    tr = MonarchTransport()
    try:
        with InferenceServer(seed_policy(), tr, max_batch_size=4):
            reply = tr.actor.infer.call_one(exit_payload()).get(timeout=30)
            assert reply[0] == "err" and isinstance(reply[1], SystemExit), reply
            assert tr.client()(obs(2), timeout=20)["action"].shape == (4,)  # still serving
    finally:
        tr.shutdown()
