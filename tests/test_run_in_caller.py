"""run_in_caller: an idle server lets a blocking caller's thread run its batch."""
import random
import threading
import time

import pytest
import torch
from tensordict import TensorDict

from rlserve import InferenceServer, NoWeightSyncScheme, ServerClosedError, ServerDeadError, ThreadingTransport


class Probe:
    """Doubles the observation and records which thread ran each batch, and how."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.runs = []  # (thread ident, grad enabled, intra-op threads, batch size)
        self.active = 0
        self.max_active = 0
        self.events = []

    def __call__(self, td):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.runs.append((threading.get_ident(), torch.is_grad_enabled(), torch.get_num_threads(), td.shape[0]))
        if self.delay:
            time.sleep(self.delay)
        out = td.clone()
        out["action"] = td["observation"] * 2
        with self.lock:
            self.active -= 1
        self.events.append("forward done")
        return out


def serving_thread(server):
    """The ident of the server's serving thread (found by its name)."""
    return next(t.ident for t in threading.enumerate() if t.name == server.name)


def _wait_asleep(transport, limit=2.0):
    # white-box on purpose: caller runs happen only while the server says it sleeps
    end = time.monotonic() + limit
    while not transport._sleeping and time.monotonic() < end:
        time.sleep(0.001)


def _calls(transport, n, **kw):
    """``n`` sequential blocking calls, each made once the server sleeps; returns the answers."""
    client = transport.client()
    outs = []
    for i in range(n):
        _wait_asleep(transport)
        x = torch.full((3,), float(i))
        out = client(TensorDict(observation=x), **kw)
        assert torch.equal(out["action"], 2 * x)
        outs.append(out)
    return outs


def test_idle_server_lets_the_caller_thread_run_its_batch():
    probe = Probe()
    transport = ThreadingTransport()
    with InferenceServer(probe, transport) as server:
        _calls(transport, 20)
        server_thread = serving_thread(server)
    me = threading.get_ident()
    on_caller = sum(r[0] == me for r in probe.runs)
    assert on_caller >= 18, probe.runs  # a rare idle-loop wake-up may take one
    assert all(r[0] in (me, server_thread) for r in probe.runs)
    assert not any(r[1] for r in probe.runs)  # no grad, as on the server thread
    assert server.stats()["requests"] == 20


def test_run_in_caller_false_keeps_the_model_on_the_server_thread():
    probe = Probe()
    transport = ThreadingTransport()
    with InferenceServer(probe, transport, run_in_caller=False) as server:
        _calls(transport, 10)
        server_thread = serving_thread(server)
    assert [r[0] for r in probe.runs] == [server_thread] * 10


@pytest.mark.parametrize("how", ["timeout", "submit", "min_batch_size", "inference_mode"])
def test_calls_that_must_not_run_in_the_caller(how):
    probe = Probe()
    transport = ThreadingTransport()
    kw = {"min_batch_size": 2, "timeout": 0.001} if how == "min_batch_size" else {}
    with InferenceServer(probe, transport, **kw) as server:
        client = transport.client()
        for i in range(5):
            _wait_asleep(transport)
            td = TensorDict(observation=torch.full((3,), float(i)))
            if how == "timeout":
                out = client(td, timeout=5)  # a forward on this thread could not honour it
            elif how == "submit":
                out = client.submit(td).result(5)  # submit returns at once, never runs the model
            elif how == "inference_mode":
                with torch.inference_mode():  # would leak into the forward's outputs
                    out = client(td)
                assert not out["action"].is_inference()
            else:
                out = client(td)
            assert torch.equal(out["action"], 2 * td["observation"])
        server_thread = serving_thread(server)
    assert [r[0] for r in probe.runs] == [server_thread] * 5


def test_caller_thread_settings_are_restored():
    probe = Probe()
    transport = ThreadingTransport()
    seen = {}
    old = torch.get_num_threads()

    def actor():
        torch.set_num_threads(2)
        torch.set_grad_enabled(True)
        _calls(transport, 5)
        seen["threads"] = torch.get_num_threads()
        seen["grad"] = torch.is_grad_enabled()
        seen["ident"] = threading.get_ident()

    try:
        with InferenceServer(probe, transport, num_threads=1):
            t = threading.Thread(target=actor)
            t.start()
            t.join(30)
    finally:
        torch.set_num_threads(old)
    caller_runs = [r for r in probe.runs if r[0] == seen["ident"]]
    assert caller_runs, "no batch ran on the caller thread"
    assert all(r[2] == 1 and not r[1] for r in caller_runs)  # the server's settings inside the forward
    assert seen == {"threads": 2, "grad": True, "ident": seen["ident"]}  # the caller's own afterwards


def test_batches_never_overlap_and_every_answer_is_right():
    probe = Probe(delay=0.0005)
    transport = ThreadingTransport()
    bad = []

    def actor(i):
        client = transport.client()
        rng = random.Random(i)
        for j in range(60):
            x = torch.full((3,), float(i * 1000 + j))
            out = client(TensorDict(observation=x))
            if not torch.equal(out["action"], 2 * x):
                bad.append((i, j))
            time.sleep(rng.random() * 0.003)  # idle gaps: some batches run on callers

    with InferenceServer(probe, transport, max_batch_size=8) as server:
        ts = [threading.Thread(target=actor, args=(i,)) for i in range(6)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        server_thread = serving_thread(server)
    assert not bad
    assert probe.max_active == 1
    runners = {r[0] for r in probe.runs}
    assert server_thread in runners and len(runners) > 1  # both kinds of batches happened
    assert sum(r[3] for r in probe.runs) == 6 * 60


class LinPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1, bias=False)
        self.lin.weight.data.fill_(0.0)
        self.threads = set()

    def forward(self, td):
        self.threads.add(threading.get_ident())
        out = td.clone()
        out["action"] = self.lin(td["observation"])
        return out


def test_weight_updates_and_versions_stay_consistent_on_caller_threads():
    policy = LinPolicy()
    transport = ThreadingTransport()
    stop = threading.Event()
    wrong = []
    with InferenceServer(policy, transport, max_batch_size=4) as server:

        def trainer():
            v = 0
            while not stop.is_set():
                v += 1
                server.update_weights({"lin.weight": torch.full((1, 1), float(v))}, version=v)
                time.sleep(0.0003)

        t = threading.Thread(target=trainer)
        t.start()
        client = transport.client()
        for _ in range(300):
            out = client(TensorDict(observation=torch.ones(1)))
            if out["action"].item() != out["policy_version"].item():
                wrong.append((out["action"].item(), out["policy_version"].item()))
            time.sleep(0.0002)
        stop.set()
        t.join(10)
    assert not wrong
    assert server.policy_version > 10
    assert threading.get_ident() in policy.threads  # some batches ran on this (caller) thread


def test_shutdown_waits_for_a_batch_running_on_a_caller_thread():
    probe = Probe(delay=0.3)

    class Recorder(NoWeightSyncScheme):
        def close_receiver(self):
            probe.events.append("receiver closed")

    transport = ThreadingTransport()
    server = InferenceServer(probe, transport, weight_sync=Recorder()).start()
    result = {}

    def actor():
        _wait_asleep(transport)
        result["out"] = transport.client()(TensorDict(observation=torch.ones(3)))
        result["ident"] = threading.get_ident()

    t = threading.Thread(target=actor)
    t.start()
    while probe.active == 0 and t.is_alive():
        time.sleep(0.001)
    server.shutdown()
    t.join(10)
    assert torch.equal(result["out"]["action"], torch.full((3,), 2.0))
    assert probe.runs[0][0] == result["ident"]
    assert probe.events == ["forward done", "receiver closed"]


class DiesOnNegative:
    """Doubles the observation; a negative one raises SystemExit (not an Exception: it stops the server)."""

    def __call__(self, td):
        if (td["observation"] < 0).any():
            raise SystemExit("the model asked the server to stop")
        out = td.clone()
        out["action"] = td["observation"] * 2
        return out


@pytest.mark.parametrize("run_in_caller", [True, False])
def test_a_model_raising_systemexit_stops_the_server_wherever_the_batch_ran(run_in_caller):
    # The same contract on both paths: the batch is answered, then the server is dead;
    # and the caller's thread can use the same client with a new server afterwards.
    transport = ThreadingTransport()
    client = transport.client()
    server = InferenceServer(DiesOnNegative(), transport, run_in_caller=run_in_caller).start()
    try:
        _wait_asleep(transport)
        assert torch.equal(client(TensorDict(observation=torch.ones(3)))["action"], torch.full((3,), 2.0))
        _wait_asleep(transport)
        with pytest.raises(SystemExit):
            client(TensorDict(observation=-torch.ones(3)))
        with pytest.raises(ServerDeadError, match="died"):
            client(TensorDict(observation=torch.ones(3)), timeout=5)
    finally:
        server.shutdown()
    with InferenceServer(DiesOnNegative(), transport, run_in_caller=run_in_caller):
        for i in range(3):
            _wait_asleep(transport)
            x = torch.full((3,), float(i))
            assert torch.equal(client(TensorDict(observation=x))["action"], 2 * x)


class MakesZeros:
    """Adds ``torch.zeros``: a tensor factory, so the calling thread's default device matters."""

    def __init__(self):
        self.threads = []

    def __call__(self, td):
        self.threads.append(threading.get_ident())
        out = td.clone()
        out["action"] = td["observation"] * 2 + torch.zeros(td["observation"].shape)
        return out


def test_a_caller_in_a_torch_function_mode_goes_to_the_server_thread():
    # torch.device(...) as a context (and set_default_device) is a thread-local mode: on the
    # caller's thread it would move the model's new tensors (here to "meta").
    model = MakesZeros()
    transport = ThreadingTransport()
    with InferenceServer(model, transport) as server:
        client = transport.client()
        for i in range(3):
            _wait_asleep(transport)
            x = torch.full((3,), float(i))
            td = TensorDict(observation=x)
            with torch.device("meta"):
                out = client(td)
            assert out["action"].device.type == "cpu"
            assert torch.equal(out["action"], 2 * x)
        server_thread = serving_thread(server)
    assert model.threads == [server_thread] * 3


def test_shutdown_from_inside_a_caller_run_batch_does_not_stall():
    # E.g. a done-callback or the model itself stops the server. On the server thread
    # shutdown skips waiting for itself; a caller-run batch must do the same, or it waits
    # (its whole timeout) for a server thread that waits for this batch's lock.
    transport = ThreadingTransport()
    state = {}

    def model(td):
        if "late" not in state:
            state["late"] = transport.submit(TensorDict(observation=torch.full((1, 3), 5.0)))
            end = time.monotonic() + 2
            while transport._q and time.monotonic() < end:  # the woken server took it...
                time.sleep(0.001)
            time.sleep(0.05)  # ...and now waits for this batch's lock
            t0 = time.monotonic()
            server.shutdown(timeout=3)
            state["shutdown_s"] = time.monotonic() - t0
        out = td.clone()
        out["action"] = td["observation"] * 2
        return out

    server = InferenceServer(model, transport).start()
    try:
        _wait_asleep(transport)
        out = transport.client()(TensorDict(observation=torch.ones(3)))
        assert torch.equal(out["action"], torch.full((3,), 2.0))
        assert state["shutdown_s"] < 1.0
        # the request the server thread had taken is still answered (or, in the rare case the
        # server woke on its own and never took it, refused as queued at shutdown): no hang
        try:
            late = state["late"].result(5)
        except ServerClosedError:
            pass
        else:
            assert torch.equal(late["action"], torch.full((1, 3), 10.0))
    finally:
        server.shutdown()
