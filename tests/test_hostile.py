"""What hostile and careless use broke once (issue 15), each checked with the real components.

A shared MPClient starving its threads; requests with their own batch size and
non-tensor entries over MPTransport; blocking calls from inside a batch; a
ThreadingTransport client in a fork child; long RequestError texts;
shutdown(timeout=T) taking 2T; pickling a thread client; Ray listening beyond
loopback. Every blocking call has a timeout: a hang is a failure, not a stuck run.
"""
import copy
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn
from tensordict import LazyStackedTensorDict, NonTensorData, TensorDict, lazy_stack
from tensordict.nn import TensorDictModule

from helpers import assert_ray_on_loopback_only, seed_policy, slow_doubler
from helpers import doubler as _doubler
from rlserve import (
    InferenceServer,
    MPTransport,
    ProcessServer,
    RequestError,
    ServerDeadError,
    ThreadingTransport,
)

_mono = time.monotonic


def doubler(sleep=0.0):
    return slow_doubler(sleep) if sleep else _doubler()


def obs(v=1.0, n=8, dtype=torch.float32):
    return TensorDict(observation=torch.full((n,), float(v), dtype=dtype))


def make_transport(kind):
    return ThreadingTransport() if kind == "threading" else MPTransport()


def _thread_alive(name):
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


# =============================================================================================
# 1. A shared MPClient starves its threads, and its timeout= does not bound the call
# =============================================================================================
def _hammer(client_for_thread, n_threads=8, calls=50, budget_s=8.0):
    """``n_threads`` threads each make ``calls`` blocking calls; returns (elapsed, latencies, errors)."""
    stop_at = _mono() + budget_s
    lat, errors = [], []
    lock = threading.Lock()

    def work(i):
        c = client_for_thread(i)
        for _ in range(calls):
            if _mono() > stop_at:
                return
            t = _mono()
            try:
                c(TensorDict(observation=torch.randn(8)), timeout=5.0)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on
                with lock:
                    errors.append(repr(e))
                return
            with lock:
                lat.append(_mono() - t)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n_threads)]
    t0 = _mono()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, stop_at + 6.0 - _mono()))
    return _mono() - t0, lat, errors, [t for t in threads if t.is_alive()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["in-process InferenceServer", "ProcessServer"])
def test_shared_mp_client_serves_its_threads_like_one_client_each(where):
    if where == "ProcessServer":
        server = ProcessServer(seed_policy, start_timeout=30).start()
    else:
        tr = MPTransport()
        server = InferenceServer(seed_policy(), tr).start()
    try:
        own_clients = [server.client() for _ in range(8)]
        base_s, base_lat, base_err, _ = _hammer(lambda i: own_clients[i])
        assert not base_err and len(base_lat) == 400, (base_err, len(base_lat))  # the control works

        shared = server.client()
        elapsed, lat, errors, stuck = _hammer(lambda i: shared)
    finally:
        server.shutdown(timeout=5)
    worst = max(lat) if lat else float("nan")
    report = (f"shared client: {len(lat)}/400 calls in {elapsed:.1f} s, worst call {worst:.2f} s, "
              f"errors {errors[:2]}, threads still stuck {len(stuck)}; "
              f"one client per thread: 400 calls in {base_s:.2f} s, worst {max(base_lat):.3f} s")
    # generous: one client per thread does the same 400 calls in ~0.1 s, worst call ~0.03 s
    assert not errors and len(lat) == 400 and elapsed < 5.0, report
    assert worst < 1.0, report


@pytest.mark.timeout(60)
def test_shared_mp_client_timeout_bounds_the_whole_call():
    """8 threads, one client, model sleeping 0.5 s: a call with timeout=1.0 returns or raises by ~1.5 s."""
    tr = MPTransport()
    server = InferenceServer(doubler(sleep=0.5), tr).start()
    shared = tr.client()
    took, lock = [], threading.Lock()

    def work():
        for _ in range(3):
            t = _mono()
            try:
                shared(TensorDict(observation=torch.randn(8)), timeout=1.0)
                what = "answer"
            except Exception as e:  # noqa: BLE001 - a TimeoutError/QueueFullError is fine, if on time
                what = type(e).__name__
            with lock:
                took.append((round(_mono() - t, 2), what))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        alive = sum(t.is_alive() for t in threads)
    finally:
        server.shutdown(timeout=5)
    worst = max(took) if took else (float("nan"), "")
    assert alive == 0, f"{alive} threads never returned"
    assert worst[0] < 1.5, (f"a call with timeout=1.0 came back after {worst[0]} s ({worst[1]}); "
                            f"slowest: {sorted(took)[-5:]}")


@pytest.mark.timeout(30)
def test_fresh_mp_client_timeout_bounds_registration():
    """Extra (found while writing the above): a fresh MPClient registers on its first call, and that
    wait ignores ``timeout=`` (up to 60 s); with the server busy in a 4 s forward, a call with
    timeout=1.0 returns only once the forward is over."""
    tr = MPTransport()
    server = InferenceServer(doubler(sleep=4.0), tr).start()
    try:
        busy = tr.client()
        fut = busy.submit(obs(1.0))  # keeps the serving thread in the forward for 4 s
        time.sleep(0.3)
        fresh = tr.client()
        t = _mono()
        got = _try(lambda: fresh(obs(2.0), timeout=1.0))
        took = _mono() - t
        _try(lambda: fut.result(timeout=10))
    finally:
        server.shutdown(timeout=10)
    assert took < 1.5, f"a fresh client's call with timeout=1.0 came back after {took:.2f} s with {got!r}"


# =============================================================================================
# 2. MPTransport fails requests with their own batch size (policy_version batch mismatch)
# 3. MPTransport drops non-tensor entries from answers
# =============================================================================================
def _linear_model():
    torch.manual_seed(0)
    return TensorDictModule(nn.Linear(8, 4), in_keys=["observation"], out_keys=["action"])


BATCHED_REQUESTS = {
    "batch_size_3": lambda: TensorDict(observation=torch.arange(24.0).reshape(3, 8), batch_size=[3]),
    "batch_size_0": lambda: TensorDict(observation=torch.zeros(0, 8), batch_size=[0]),
    "lazy_stack": lambda: lazy_stack([TensorDict(observation=torch.arange(8.0) + i) for i in range(2)]),
    "LazyStackedTensorDict": lambda: LazyStackedTensorDict(
        *[TensorDict(observation=torch.arange(8.0) - i) for i in range(3)], stack_dim=0),
}


def _answers(kind, model, requests, prime=True, version=7):
    """Serve ``requests`` (in order) over transport ``kind``; returns answers or exceptions."""
    tr = make_transport(kind)
    server = InferenceServer(copy.deepcopy(model), tr).start()
    try:
        server.update_weights(model.state_dict(), version=version)  # a stamp that is not the default 0
        c = tr.client()
        if prime:  # ordinary traffic first: the transport has seen (and learned) the usual layout
            c(obs(1.0), timeout=10)
        out = []
        for td in requests:
            try:
                out.append(c(td, timeout=10))
            except Exception as e:  # noqa: BLE001 - compared below
                out.append(e)
        return out
    finally:
        server.shutdown(timeout=5)


def _leaves(td):
    return {k: v for k, v in td.items(include_nested=True, leaves_only=True)}


def _assert_same_answer(got, want, what):
    assert not isinstance(want, Exception), f"control: ThreadingTransport failed {what}: {want!r}"
    assert not isinstance(got, Exception), f"MPTransport failed {what}: {type(got).__name__}: {got}"
    assert got.batch_size == want.batch_size, (what, got.batch_size, want.batch_size)
    g, w = _leaves(got), _leaves(want)
    assert set(g) == set(w), (what, sorted(map(str, g)), sorted(map(str, w)))
    for k in w:
        assert torch.is_tensor(g[k]) and g[k].shape == w[k].shape and g[k].dtype == w[k].dtype, (what, k)
        assert torch.allclose(g[k], w[k]) if g[k].is_floating_point() else torch.equal(g[k], w[k]), (what, k)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("req", list(BATCHED_REQUESTS))
def test_mp_serves_requests_with_their_own_batch_size(req):
    model = _linear_model()
    make = BATCHED_REQUESTS[req]
    want = _answers("threading", model, [make(), make()])
    got = _answers("mp", model, [make(), make()])
    for i in range(2):
        _assert_same_answer(got[i], want[i], f"{req} request #{i + 1}")
    assert torch.equal(got[0]["policy_version"], torch.full(want[0].batch_size, 7))


def _with_non_tensor():
    return TensorDict(observation=torch.ones(8), tag=NonTensorData("abc"))


def _with_string():
    td = TensorDict(observation=torch.ones(8))
    td["name"] = "hello"  # stored as NonTensorData
    return td


NON_TENSOR_REQUESTS = {"NonTensorData": (_with_non_tensor, "tag", "abc"), "plain_str": (_with_string, "name", "hello")}


@pytest.mark.timeout(40)
@pytest.mark.parametrize("prime", [False, True], ids=["first-request", "after-ordinary-traffic"])
@pytest.mark.parametrize("req", list(NON_TENSOR_REQUESTS))
def test_mp_keeps_non_tensor_entries_in_answers(req, prime):
    make, key, value = NON_TENSOR_REQUESTS[req]
    model = doubler()
    (want,) = _answers("threading", model, [make()], prime=prime)
    (got,) = _answers("mp", model, [make()], prime=prime)
    assert not isinstance(want, Exception) and want[key] == value  # control: ThreadingTransport keeps it
    assert not isinstance(got, Exception), repr(got)
    assert key in got.keys(), f"{key!r} vanished from the MPTransport answer: keys {sorted(got.keys())}"
    assert got[key] == value
    assert torch.equal(got["action"], want["action"])


# =============================================================================================
# 4. A call from inside a batch (the model, a done-callback) deadlocks the server
# =============================================================================================
_INNER_TIMEOUT_S = 12.0  # the nested call's own timeout: today the server stalls this long, then recovers


class Reentrant:
    """Doubles observations; a request carrying 'reenter' makes the model call the server itself."""

    def __init__(self):
        self.client = None
        self.inner = []  # (exception type, message, seconds) of each nested call

    def __call__(self, td):
        if "reenter" in td.keys():
            t = _mono()
            try:
                self.client(obs(5.0), timeout=_INNER_TIMEOUT_S)
                self.inner.append(("answer", "", round(_mono() - t, 2)))
            except Exception as e:
                self.inner.append((type(e).__name__, str(e)[:200], round(_mono() - t, 2)))
                raise
        td.set("action", td["observation"] * 2)
        return td


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", ["model/threading", "model/mp", "model/threading-caller-runs", "callback/threading"])
def test_call_from_inside_a_batch_fails_fast_and_server_keeps_serving(case):
    where, kind = case.split("/")
    caller_runs = kind == "threading-caller-runs"
    name = f"issue15-srv-{case.replace('/', '-')}"
    model = Reentrant()
    tr = make_transport("mp" if kind == "mp" else "threading")
    server = InferenceServer(model, tr, name=name).start()
    c = tr.client()
    nested = model.client = tr.client()  # the client the model / the callback uses
    other = tr.client()  # another actor, for the call after the nested one
    facts = {}
    try:
        for cl in (c, nested, other):  # the server works; MP clients are registered now (a fresh
            cl(obs(1.0), timeout=10)   # MPClient's registration ignores timeout=, see the extra test below)
        t = _mono()
        if where == "model":
            req = TensorDict(observation=torch.ones(8), reenter=torch.ones(1))
            if caller_runs:  # no timeout: the idle server lets this thread run the batch itself
                box = []
                th = threading.Thread(target=lambda: box.append(_try(lambda: c(req))), daemon=True)
                th.start()
                th.join(3.0)
                facts["outer"] = (box[0] if box else "still blocked after 3 s", round(_mono() - t, 2))
            else:
                facts["outer"] = (_try(lambda: c(req, timeout=3.0)), round(_mono() - t, 2))
            inner = model.inner
        else:  # a submit() future's done-callback makes a blocking call
            inner = []

            def cb(_fut):
                t1 = _mono()
                try:
                    nested(obs(5.0), timeout=_INNER_TIMEOUT_S)
                    inner.append(("answer", "", round(_mono() - t1, 2)))
                except Exception as e:  # noqa: BLE001
                    inner.append((type(e).__name__, str(e)[:200], round(_mono() - t1, 2)))

            fut = c.submit(obs(2.0))
            fut.add_done_callback(cb)
            facts["outer"] = (_try(lambda: fut.result(timeout=3.0)), round(_mono() - t, 2))
            deadline = _mono() + 3.0
            while not inner and _mono() < deadline:
                time.sleep(0.01)
        facts["inner"] = list(inner) or "nested call still blocked"
        t = _mono()
        facts["later call"] = (_try(lambda: other(obs(3.0), timeout=1.0)), round(_mono() - t, 2))
    finally:
        t = _mono()
        server.shutdown(timeout=2)
        facts["shutdown(timeout=2)"] = round(_mono() - t, 2)
        facts["serving thread alive after shutdown"] = _thread_alive(name)
    msg = f"{case}: {facts}"
    # the nested call raises a clear error at once (not a timeout)
    assert inner and inner[0][0] not in ("answer", "TimeoutError") and inner[0][2] < 1.0, msg
    if where == "model":  # and the offending request gets an exception, promptly
        outer, secs = facts["outer"]
        assert isinstance(outer, Exception) and not isinstance(outer, TimeoutError) and secs < 1.5, msg
    assert isinstance(facts["later call"][0], TensorDict), msg  # the server keeps serving others
    assert facts["shutdown(timeout=2)"] < 3.0 and not facts["serving thread alive after shutdown"], msg


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return e


# =============================================================================================
# 5. A fork child using a ThreadingTransport client
# =============================================================================================
class PidModel:
    """Doubles observations and stamps the pid of the process that ran the batch."""

    def __call__(self, td):
        td.set("action", td["observation"] * 2)
        td.set("pid", torch.full(td.batch_size, os.getpid(), dtype=torch.int64))
        return td


def _fork_child_call(client, conn, timeout):
    t = time.monotonic()
    try:
        out = client(obs(1.0), timeout=timeout)
        conn.send(("answer", f"batch ran in pid {int(out['pid'])} (child {os.getpid()})", time.monotonic() - t))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send((type(e).__name__, str(e)[:300], time.monotonic() - t))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call_timeout", [None, 3.0], ids=["no-timeout", "timeout-3s"])
@pytest.mark.parametrize("run_in_caller", [False, True], ids=["server-thread", "run_in_caller"])
def test_threading_client_in_fork_child_raises_at_once(run_in_caller, call_timeout):
    ctx = mp.get_context("fork")
    tr = ThreadingTransport()
    server = InferenceServer(PidModel(), tr, run_in_caller=run_in_caller).start()
    p = None
    try:
        c = tr.client()
        c(obs(1.0), timeout=5)  # works in the parent
        here, there = ctx.Pipe()
        p = ctx.Process(target=_fork_child_call, args=(c, there, call_timeout), daemon=True)
        p.start()
        got = here.recv() if here.poll(5.0) else ("no report", "the child's call was still blocked after 5 s", 5.0)
    finally:
        if p is not None:
            p.kill()
            p.join(5)
        server.shutdown(timeout=5)
    kind, text, secs = got
    msg = f"fork child got {kind}: {text!r} after {secs:.2f} s"
    clear = kind == ServerDeadError.__name__ or (
        kind not in ("answer", "no report", "TimeoutError") and "fork" in text.lower())
    assert clear, msg
    assert secs < 1.0, msg


# =============================================================================================
# 6. RequestError diffs against the newest accepted layout, not what the model reads
# =============================================================================================
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["threading", "mp"])
def test_request_error_names_what_the_model_reads_and_stays_short(kind):
    torch.manual_seed(0)
    model = TensorDictModule(nn.Linear(8, 4), in_keys=["observation"], out_keys=["action"])
    tr = make_transport(kind)
    with InferenceServer(model, tr) as server:
        c = server.client()
        big = TensorDict({f"extra_{i}": torch.zeros(1) for i in range(999)})
        big["observation"] = torch.ones(8)
        c(big, timeout=10)  # accepted: the model reads only 'observation'
        with pytest.raises(RequestError) as info:
            c(obs(1.0, dtype=torch.float64), timeout=10)
    text = str(info.value)
    assert "observation" in text, text[:500]
    assert len(text) < 500, f"{len(text)} characters: {text[:300]} ... {text[-200:]}"
    assert "extra_5" not in text, f"lists keys the model never reads: {text[:300]} ..."


# =============================================================================================
# 7. shutdown(timeout=T) can take 2T
# =============================================================================================
@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", ["busy InferenceServer/threading", "busy InferenceServer/mp", "stopped ProcessServer"])
def test_shutdown_is_bounded_by_its_timeout(case):
    T = 2.0
    if case.startswith("busy"):
        tr = make_transport(case.split("/")[1])
        server = InferenceServer(doubler(sleep=6.0), tr).start()
        fut = tr.client().submit(obs(1.0))
        time.sleep(0.3)  # the forward is running
        t = _mono()
        server.shutdown(timeout=T)
        took = _mono() - t
        try:
            fut.result(timeout=5)
        except Exception:  # noqa: BLE001 - answered or refused: either is fine here
            pass
    else:
        ps = ProcessServer(seed_policy, start_timeout=30).start()
        pid = ps.pid
        try:
            ps.client()(obs(1.0), timeout=10)
            os.kill(pid, signal.SIGSTOP)
            t = _mono()
            ps.shutdown(timeout=T)
            took = _mono() - t
        finally:
            try:  # never leave a stopped process behind
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert took < T + 1.0, f"{case}: shutdown(timeout={T}) took {took:.2f} s"


# =============================================================================================
# 8. Pickling a ThreadingTransport client
# =============================================================================================
@pytest.mark.timeout(10)
def test_pickling_threading_client_says_what_to_use_instead():
    tr = ThreadingTransport()
    with InferenceServer(doubler(), tr):
        client = tr.client()
        with pytest.raises(Exception) as info:
            pickle.dumps(client)
    text = str(info.value)
    assert "MPTransport" in text, f"{type(info.value).__name__}: {text}"


# =============================================================================================
# 9. Every server a test or benchmark starts listens on 127.0.0.1 only (Ray included)
#
# Ray 2.60 listens on "::" (every interface) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the
# environment before Ray is imported (conftest sets it; so does rlserve.bench); then every Ray
# process, ray.cluster_utils.Cluster's too (test_ray_cluster.py), listens on 127.0.0.1.
# =============================================================================================
def _getpid():
    return os.getpid()


def _start_a_worker(ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    pid = ray.get(ray.remote(num_cpus=0)(_getpid).remote(), timeout=60)
    time.sleep(0.5)  # the worker's server is up once it ran a task; let the rest settle
    return pid


@pytest.mark.timeout(90)
def test_the_test_sessions_ray_listens_on_loopback_only(ray_local):
    _start_a_worker(ray_local)
    assert_ray_on_loopback_only(within_pid=os.getpid())


@pytest.mark.timeout(120)
def test_the_benchmarks_ray_listens_on_loopback_only():
    pytest.importorskip("ray")
    """The benchmarks start Ray their own way (rlserve.bench.ray_actors.init_ray): in a fresh
    process, as a benchmark run would, it must keep every Ray process on 127.0.0.1 too."""
    import subprocess

    code = ("import os, sys, time\n"
            "os.environ.pop('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', None)  # the benchmark must set it itself\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from rlserve.bench.ray_actors import init_ray\n"
            "init_ray()\n"
            "import ray\n"
            "def pid():\n    return os.getpid()\n"
            "ray.get(ray.remote(num_cpus=0)(pid).remote(), timeout=60)\n"
            "time.sleep(0.5)\n"
            "from helpers import assert_ray_on_loopback_only\n"
            "assert_ray_on_loopback_only(within_pid=os.getpid())\n"
            "print('LOOPBACK-ONLY')\n"
            "ray.shutdown()\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, timeout=110)
    assert "LOOPBACK-ONLY" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


# =============================================================================================
# 10. Found in review: restarts under a shared MPClient, submit() from a full batch, ProcessServer
#     commands after a timeout, weights a restart starts from, a stop by shutdown_event
# =============================================================================================
def _echo(td):
    return td.set("echo", td["observation"] * 1.0)


@pytest.mark.timeout(90)
def test_shared_mp_client_through_server_restarts_never_crosses_answers():
    """Six threads share one MPClient (blocking calls and futures) while the server restarts every few
    tens of ms. Was: answers handed to the wrong thread, futures never resolved, raw AttributeError /
    OSError / FileNotFoundError from the client's internals, clean restarts reported as crashes."""
    import random

    from rlserve import RLServeError, ServerClosedError

    tr = MPTransport()
    server = InferenceServer(_echo, tr, max_batch_size=8)
    c = tr.client()
    crossed, foreign, kinds, answered = [], [], {}, [0]
    stop = _mono() + 4.0

    def worker(k):
        r = random.Random(k)
        while _mono() < stop:
            v = float(k * 1_000_000 + r.randrange(1_000_000))
            req = TensorDict(observation=torch.tensor([v]))
            try:
                a = c(req, timeout=5) if k % 2 else c.submit(req).result(timeout=20)
                answered[0] += 1
                if a["echo"].item() != v:
                    crossed.append((k, v, a["echo"].item()))
            except RLServeError as e:
                kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                time.sleep(0.001)
            except Exception as e:  # noqa: BLE001 - anything else leaked from the internals (or a hang)
                foreign.append(repr(e)[:200])

    server.start()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    rng, restarts = random.Random(0), 0
    try:
        while _mono() < stop:
            time.sleep(rng.random() * 0.05)
            server.shutdown(timeout=5)
            time.sleep(rng.random() * 0.02)
            server.start()
            restarts += 1
        for t in threads:
            t.join(30)
        hung = sum(t.is_alive() for t in threads)
        after = c(TensorDict(observation=torch.tensor([42.0])), timeout=10)  # the client works afterwards
    finally:
        server.shutdown(timeout=5)
    facts = f"restarts={restarts} answered={answered[0]} errors={kinds} foreign={foreign[:3]} crossed={crossed[:3]}"
    assert hung == 0, facts
    assert crossed == [] and foreign == [], facts
    assert set(kinds) <= {ServerClosedError.__name__}, facts  # a clean restart is never reported as a crash
    assert answered[0] > 100 and restarts > 20 and after["echo"].item() == 42.0, facts


class _SubmitsWhileServing:
    """The model submits one more request from inside its batch, as the reentry error advises."""

    def __init__(self):
        self.client = None
        self.inner = []

    def __call__(self, td):
        if (td["observation"] > 100).any():
            try:
                self.inner.append(self.client.submit(obs(1.0)))
            except Exception as e:  # noqa: BLE001
                self.inner.append(e)
        return td.set("action", td["observation"] * 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["threading", "mp"])
def test_submit_from_inside_a_full_batch_fails_fast(kind):
    """Was: with every place taken (max_pending=1 / max_inflight=1) submit() inside the batch waited for
    a place only that batch frees: the serving thread hung for good."""
    from rlserve import QueueFullError

    tr = ThreadingTransport(max_pending=1) if kind == "threading" else MPTransport(max_inflight=1)
    model = _SubmitsWhileServing()
    server = InferenceServer(model, tr, max_batch_size=4).start()
    try:
        model.client = c = tr.client()
        t = _mono()
        outer = _try(lambda: c(obs(1000.0), timeout=5))
        took = _mono() - t
        assert took < 2.0, f"the batch waited {took:.1f} s"
        assert len(model.inner) == 1 and isinstance(model.inner[0], QueueFullError), model.inner
        assert "inside a batch" in str(model.inner[0])
        assert isinstance(outer, TensorDict) and torch.equal(outer["action"], torch.full((8,), 2000.0))
        assert torch.equal(c(obs(3.0), timeout=5)["action"], torch.full((8,), 6.0))  # still serving
    finally:
        server.shutdown(timeout=2)
    assert not server.is_alive


def _zero_weights():
    return {k: torch.zeros_like(v) for k, v in seed_policy().state_dict().items()}


@pytest.mark.timeout(120)
def test_process_server_replies_stay_paired_after_a_command_times_out():
    """Was: the late reply to a timed-out command answered the next one (stats() returned an int,
    policy_version a dict) for the rest of the session; and weights applied after the timeout were
    forgotten by a restart."""
    ps = ProcessServer(seed_policy, start_timeout=60).start()
    try:
        with pytest.raises(TimeoutError):
            ps.update_weights(_zero_weights(), timeout=0)  # no reply can come back in no time
        st = ps.stats()
        assert isinstance(st, dict) and "requests" in st, st
        assert ps.policy_version == 1
        h = ps.health()
        assert "control_error" not in h and h["policy_version"] == 1, h
        ps.shutdown()
        ps.start()  # the late-applied weights are the ones a restarted process starts from
        ans = ps.client()(obs(1.0), timeout=10)
        assert torch.count_nonzero(ans["action"]) == 0 and ans["policy_version"].item() == 1
    finally:
        ps.shutdown()


@pytest.mark.timeout(120)
def test_process_server_restarts_from_the_weights_as_they_were_sent():
    """Was: the server kept the caller's tensors, so a restart served whatever they had become since,
    under the old version number."""
    ps = ProcessServer(seed_policy, start_timeout=60).start()
    try:
        sent = _zero_weights()
        assert ps.update_weights(sent) == 1
        for v in sent.values():
            v.fill_(1.0)  # the trainer goes on changing its tensors in place
        ps.shutdown()
        ps.start()
        ans = ps.client()(obs(1.0), timeout=10)
        assert torch.count_nonzero(ans["action"]) == 0 and ans["policy_version"].item() == 1
    finally:
        ps.shutdown()


@pytest.mark.timeout(20)
def test_a_stop_by_shutdown_event_reads_as_closed_not_dead():
    from rlserve import ServerClosedError

    ev = threading.Event()
    server = InferenceServer(doubler(), shutdown_event=ev).start()
    c = server.client()
    try:
        assert torch.equal(c(obs(1.0), timeout=5)["action"], torch.full((8,), 2.0))
        ev.set()
        deadline = _mono() + 5
        while server.is_alive and _mono() < deadline:
            time.sleep(0.01)
        err = _try(lambda: c(obs(1.0), timeout=5))
        assert type(err) is ServerClosedError, repr(err)
        h = server.health()
        assert h["is_alive"] is False and "died" not in h, h
    finally:
        server.shutdown(timeout=2)
