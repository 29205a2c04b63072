"""Parity with torchrl 0.14.1's ``torchrl.modules.inference_server``: each scenario runs against both.

rlserve is meant to be a drop-in replacement: code written for torchrl runs after changing
only its import line to ``from rlserve import ...``. Each scenario here is written once
against ``lib`` (torchrl's module or rlserve's) and runs on both, so every claimed
equivalence is checked against the real reference, not against a description of it.
Where torchrl has a documented defect that rlserve deliberately fixes
(/work/notes/torchrl_inference_api.md section 12), the test is rlserve-only, asserts the
better behaviour, and the difference is listed in ``DIFFERENCES`` (it goes into
docs/torchrl.md). A few ``*_reference`` tests pin torchrl's side of such a difference, so the
list cannot silently go stale when torchrl changes.

Comments marked ``was a gap`` name a behaviour rlserve once got wrong, which the assertion
next to them now holds it to.

Needs torchrl (skipped without it): run with the td014 environment,
    OMP_NUM_THREADS=1 .venv-td014/bin/python -m pytest -q -p no:cacheprovider tests/test_torchrl_parity.py
Ray scenarios are skipped where Ray is not installed.
"""
import dataclasses
import importlib.util
import multiprocessing as mp
import queue
import re
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

if importlib.util.find_spec("torchrl") is None:  # a spec check, so spawned children do not import torchrl
    pytest.skip("torchrl is not installed (use .venv-td014)", allow_module_level=True)

import torch
import torch.nn as nn
from tensordict import NonTensorData, TensorDict
from tensordict.nn import InteractionType, TensorDictModule
from helpers import QueueScheme, seed_policy

T = 30.0  # timeout (s) of every blocking call that should answer at once
T_PROC = 120.0  # ... and of the first answer of a server process that is still starting

# (torchrl 0.14.1 behaviour, rlserve behaviour, reason). Everything these tests found to differ.
DIFFERENCES = [
    ("One bad request (wrong shape, missing key, not a TensorDict) fails every request "
     "drained with it: the whole batch gets the same exception.",
     "Only the offending request fails (RequestError naming the cause); the others in the batch "
     "are answered normally.",
     "A client's mistake must not fail unrelated actors sharing the server."),
    ("A request sent to a thread server after shutdown() (InferenceClient, SlotTransport, "
     "thread-served MPTransport) blocks forever: no error, and InferenceClient.__call__ has no timeout.",
     "The call raises ServerClosedError (a RuntimeError) at once; every client call also accepts timeout=.",
     "A hang is the worst possible failure for an actor; the cause should be named."),
    ("PolicyClientModules with different interaction types whose requests meet in one batch: the whole "
     "batch fails with RuntimeError('InferenceServer received a mixed interaction-type batch...').",
     "Requests are grouped by interaction type: each group runs under its own type, all are answered.",
     "Mixing an exploring and a deterministic (evaluation) actor on one server is a normal use."),
    ("A batch mixing stamped (PolicyClientModule) and unstamped (raw client) requests runs under the "
     "ambient interaction type and leaks the '_torchrl_inference_interaction_type' marker into answers.",
     "Each request runs under its own caller's type; the marker never appears in an answer.",
     "The marker is transport plumbing, not data."),
    ("InferenceServer.update_policy_weights_(model_id, policy_or_weights) ignores its arguments: it only "
     "bumps policy_version (the served weights stay the old ones).",
     "The given weights (module, TensorDict of parameters or state dict) are applied between batches, "
     "then the version is bumped; with no weights it only bumps the version, as torchrl.",
     "The name promises that weights are applied; a silent no-op serves stale weights under a new version."),
    ("ProcessInferenceServer restart after shutdown() rebuilds the policy from policy_factory: weights "
     "sent with update_model_weights are lost, and answers are stamped with the initial version while "
     "server.policy_version still reports the updated one.",
     "A restarted server process starts from the newest weights sent, and stamps their version.",
     "A restart must not silently roll the policy back."),
    ("static_batch_size without a CUDA policy_device: ValueError('static_batch_size requires an explicit "
     "CUDA policy_device.') at construction.",
     "Accepted on any device: every batch is padded to static_batch_size rows (padding dropped from the "
     "answers); only prepare_cudagraph() needs CUDA.",
     "Fixed batch shapes are useful without CUDA graphs too (e.g. compiled models)."),
    ("SharedMemWeightSyncScheme/MultiProcessWeightSyncScheme: the served model aliases the trainer's "
     "shared-memory parameters, so in-place optimizer steps reach inference before send() (torn, "
     "unversioned weights).",
     "A torchrl scheme receives into a staging copy; the server copies it into the live model between "
     "batches, after send(), and bumps the version then.",
     "Answers must always come from one complete, versioned set of weights."),
    ("The thread server has no health() (AttributeError); ProcessInferenceServer and the Ray owner do.",
     "Every owner has health(): the thread server's returns {'is_alive', 'policy_version', 'transport'}.",
     "One method set across owners."),
    ("stats()['requests_per_s'] is requests / time since construction (or the last reset).",
     "requests_per_s is measured over the last 5 s; rlserve adds its own keys (mean_batch_size, "
     "batch_size_hist, queue_wait_ms, forward_ms, latency_ms, errors, rejected, uptime_s) to torchrl's 11.",
     "A rate since construction goes to zero for a long-lived, idle-then-busy server."),
    ("MPTransport(use_manager=False): clients must be created before the server process starts (later "
     "ones are never answered); use_manager=True starts a Manager process; ctx picks the start method.",
     "use_manager and ctx are accepted and ignored: clients can be made at any time, in any process, "
     "started by any method.",
     "rlserve's MPTransport registers clients over a socket, so neither restriction exists."),
    ("SharedMemoryTransport drops a PolicyClientModule's interaction-type stamp (only spec keys travel): "
     "requests run under the server's ambient type.",
     "The stamp travels with every transport (stamped requests go by the pickled path if the layout lacks it).",
     "interaction_type= must mean the same whatever the transport."),
    ("InferenceClient.__call__(td) and _SlotClient.__call__(td) take no timeout (nor does "
     "PolicyClientModule.forward).",
     "Every rlserve client's __call__ accepts timeout= (TimeoutError when it passes).",
     "Bounded waits everywhere."),
    ("Requests of different shapes drained together fail together (lazy_stack error for the whole batch).",
     "They run as separate groups (one forward each); all are answered.",
     "Heterogeneous actors are normal."),
    ("No validation of max_batch_size (0: the server never serves) or min_batch_size > max_batch_size "
     "(every batch waits the full timeout).",
     "ValueError at construction for both (InferenceServerConfig itself still accepts them, as torchrl's).",
     "Fail early instead of hanging."),
    ("start() after a shutdown(timeout=...) that timed out starts a second serving loop beside the first.",
     "start() raises RuntimeError while the previous loop is still finishing its batch.",
     "Two loops would serve one model concurrently."),
    ("InferenceClient (ThreadingTransport's client) is a plain class; other clients are Mailbox/slot objects.",
     "Every client is a tensordict.nn.TensorDictModuleBase (an nn.Module), with in_keys/out_keys.",
     "A client can stand wherever a torchrl policy module goes (TensorDictSequential, collectors)."),
    ("MPTransport.submit(td) and SharedMemoryTransport.submit(td) raise RuntimeError('<cls>.submit() is not "
     "supported. Call transport.client() to create a client.').",
     "They work (through a client of the serving process) and return a Future.",
     "An extension; code written for torchrl never calls them."),
]

TORCHRL_STATS_KEYS = {"requests", "batches", "requests_per_s", "batches_per_s", "avg_batch_size",
                      "p50_queue_ms", "p95_queue_ms", "p50_forward_ms", "p95_forward_ms",
                      "policy_version", "weight_updates"}
# public attributes of torchrl's thread InferenceServer (spec section 3)
TORCHRL_SERVER_ATTRS = ("model", "transport", "max_batch_size", "static_batch_size", "min_batch_size",
                        "timeout", "collate_fn", "policy_device", "device", "output_device", "weight_sync",
                        "policy_version_key", "collect_stats", "stats_window_size")
MARKER = "_torchrl_inference_interaction_type"

NAMES = ("InferenceClient", "InferenceDeviceConfig", "InferenceServer", "InferenceServerConfig",
         "InferenceTransport", "MPTransport", "PolicyClientModule", "ProcessInferenceServer",
         "ProcessSlotTransport", "SharedMemoryTransport", "SlotTransport", "ThreadingTransport")
LIBS = ("torchrl", "rlserve")


def load(name: str) -> types.SimpleNamespace:
    """The classes of one library, under the same names: ``lib.InferenceServer``, ..."""
    if name == "torchrl":
        import torchrl.modules.inference_server as M
    else:
        import rlserve as M
    ns = types.SimpleNamespace(name=name, M=M)
    for n in NAMES:
        setattr(ns, n, getattr(M, n))
    return ns


@pytest.fixture(params=LIBS)
def lib(request):
    return load(request.param)


@pytest.fixture
def rls():
    """rlserve alone (scenarios where torchrl has a documented defect)."""
    return load("rlserve")


# -- helpers ----------------------------------------------------------------------------------
def obs(n: int = 8) -> TensorDict:
    return TensorDict({"observation": torch.randn(n)})


def call(client, td, timeout=T):
    """One answer, bounded: ``client.submit(td).result(timeout)`` works with every client type of both."""
    return client.submit(td).result(timeout=timeout)


def expected(policy, td) -> torch.Tensor:
    with torch.no_grad():
        return policy(td.clone())["action"]


def zero_policy_weights(policy) -> TensorDict:
    """A TensorDict of ``policy``'s parameters with every value zero (answers then are all zero)."""
    w = TensorDict.from_module(policy).data.clone()
    return w.apply(torch.zeros_like)


def shifted_weights(policy, delta=0.5) -> TensorDict:
    return TensorDict.from_module(policy).data.clone().apply(lambda t: t + delta)


def wait_until(pred, timeout=T, every=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v is not None and v is not False:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def version_of(answer) -> int:
    return int(answer["policy_version"])


def shutdown_all(*servers):
    for s in servers:
        try:
            s.shutdown()
        except Exception:
            pass


def close_transport(tr):
    """torchrl's manager-backed MPTransport needs close() (its Manager process); rlserve accepts it too."""
    close = getattr(tr, "close", None)
    if callable(close):
        close()


class OneHot(nn.Module):
    """CartPole policy: one-hot of argmax(Linear(4, 2))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return torch.nn.functional.one_hot(self.lin(x).argmax(-1), 2)


def cartpole_policy() -> TensorDictModule:
    torch.manual_seed(0)
    return TensorDictModule(OneHot(), in_keys=["observation"], out_keys=["action"])


def gaussian_policy():
    """loc/scale from a Linear, action ~ Normal(loc, scale); its own default type is RANDOM, so
    DETERMINISTIC only happens when the request says so."""
    from tensordict.nn import (NormalParamExtractor, ProbabilisticTensorDictModule,
                               ProbabilisticTensorDictSequential)
    from torch.distributions import Normal

    torch.manual_seed(0)
    net = TensorDictModule(nn.Sequential(nn.Linear(8, 4), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    head = ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"],
                                         distribution_class=Normal,
                                         default_interaction_type=InteractionType.RANDOM)
    return ProbabilisticTensorDictSequential(net, head)


def mp_child_call(client, out_q):
    """Body of a spawned actor (scenario 9): one call through an MPTransport client, shape back."""
    torch.manual_seed(1)
    td = TensorDict({"observation": torch.randn(8)})
    try:
        res = client(td, timeout=60)
        out_q.put(("ok", tuple(res["action"].shape), int(res["policy_version"]),
                   res["observation"].tolist(), res["action"].tolist()))
    except BaseException as e:  # report, never hang the parent
        out_q.put(("err", repr(e)))


# =============================================================================================
# 1. The seed documents' usage
# =============================================================================================
@pytest.mark.timeout(60)
def test_seed_docs_threading_usage(lib, policy):
    transport = lib.ThreadingTransport()
    server = lib.InferenceServer(policy, transport, max_batch_size=32).start()
    try:
        client = transport.client()
        assert isinstance(client, lib.InferenceClient)
        observations = [obs() for _ in range(48)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(client, observations))
        for td, ans in zip(observations, answers):
            assert torch.allclose(ans["action"], expected(policy, td), atol=1e-6)
            assert torch.equal(ans["observation"], td["observation"])
            assert ans["policy_version"].dtype == torch.long and version_of(ans) == 0
        st = server.stats()
        assert st["requests"] == 48 and 1 <= st["batches"] <= 48
    finally:
        server.shutdown()


# =============================================================================================
# 2. transport="auto", context manager, server.client()
# =============================================================================================
@pytest.mark.timeout(60)
def test_auto_transport_context_manager(lib):
    torch.manual_seed(0)
    policy = TensorDictModule(nn.Linear(4, 2), in_keys=["obs"], out_keys=["act"])
    with lib.InferenceServer(policy, transport="auto", max_batch_size=8) as server:
        assert server.is_alive
        assert server.transport_kind == "thread" and server.service_backend == "thread"
        assert isinstance(server.transport, lib.ThreadingTransport)
        assert server.max_batch_size == 8
        client = server.client()
        assert isinstance(client, lib.InferenceClient)
        td = TensorDict({"obs": torch.randn(4)})
        result = client(td)
        assert result["act"].shape == torch.Size([2])
        assert torch.allclose(result["act"], policy(td.clone())["act"])
        assert "act" not in td.keys()  # the caller's TensorDict is not modified
        batched = TensorDict({"obs": torch.randn(3, 4)}, [3])  # a batched request keeps its batch size
        out = call(client, batched)
        assert out.batch_size == torch.Size([3]) and out["act"].shape == (3, 2)
        assert out["policy_version"].shape == (3,)
    assert not server.is_alive


# =============================================================================================
# 3. Submit before start: queued, served after start
# =============================================================================================
@pytest.mark.timeout(60)
def test_submit_before_start_threads(lib, policy):
    transport = lib.ThreadingTransport()
    td1, td2 = obs(), obs()
    fut_client = transport.client().submit(td1)
    fut_transport = transport.submit(td2)  # ThreadingTransport.submit works on the transport itself
    server = lib.InferenceServer(policy, transport)
    time.sleep(0.1)
    assert not fut_client.done() and not fut_transport.done()
    server.start()
    try:
        assert torch.allclose(fut_client.result(timeout=T)["action"], expected(policy, td1), atol=1e-6)
        assert torch.allclose(fut_transport.result(timeout=T)["action"], expected(policy, td2), atol=1e-6)
    finally:
        server.shutdown()


@pytest.mark.timeout(60)
def test_submit_before_start_mp_transport_thread_server(lib, policy):
    """An MPTransport served by a thread server; the clients are made before start (torchrl's rule
    for a plain, non-manager MPTransport).
    Was a gap (a race): start() bound the transport before it marked the server serving, and a waiting
    MPClient took "bound but not accepting" for "shut down"."""
    transport = lib.MPTransport()
    clients = [transport.client() for _ in range(3)]
    tds = [obs() for _ in clients]
    futs = [c.submit(td) for c, td in zip(clients, tds)]
    server = lib.InferenceServer(policy, transport).start()
    try:
        for td, fut in zip(tds, futs):
            ans = fut.result(timeout=T)
            assert torch.allclose(ans["action"], expected(policy, td), atol=1e-6)
            assert version_of(ans) == 0
    finally:
        server.shutdown()
        close_transport(transport)


# =============================================================================================
# 4. Constructor: policy_factory, policy_version, policy_version_key
# =============================================================================================
@pytest.mark.timeout(60)
def test_policy_factory_thread_backend(lib):
    made = []

    def factory():
        made.append(threading.current_thread())
        return seed_policy()

    server = lib.InferenceServer(policy_factory=factory)
    assert made == [threading.current_thread()]  # called once, in the caller's thread, at construction
    assert isinstance(server.model, nn.Module)
    with server:
        td = obs()
        assert torch.allclose(call(server.client(), td)["action"], expected(seed_policy(), td), atol=1e-6)


@pytest.mark.timeout(60)
def test_policy_version_and_key(lib, policy):
    with lib.InferenceServer(policy, policy_version=5) as server:
        assert server.policy_version == 5
        ans = call(server.client(), obs())
        assert version_of(ans) == 5 and ans["policy_version"].dtype == torch.long
        assert server.stats()["policy_version"] == 5
    with lib.InferenceServer(policy, policy_version_key=("meta", "ver")) as server:
        ans = call(server.client(), obs())
        assert int(ans["meta", "ver"]) == 0 and ans["meta", "ver"].dtype == torch.long
        assert "policy_version" not in ans.keys()
    with lib.InferenceServer(policy, policy_version_key=None, policy_version=2) as server:
        ans = call(server.client(), obs())
        assert set(ans.keys()) == {"observation", "action"}
        assert server.stats()["policy_version"] == 2 and server.policy_version == 2


# =============================================================================================
# 5. Validation: same exception type, same message
# =============================================================================================
def _cfg(lib, **kw):
    return lib.InferenceServerConfig(**kw)


def _dcfg(lib, **kw):
    return lib.InferenceDeviceConfig(**kw)


NOMGR = {"use_manager": False}  # keeps torchrl from starting a Manager process for a construction that fails
VALIDATION = [
    # id, builder(lib, policy) -> call, exception, message (regex, fully matched)
    ("server_config+max_batch_size", lambda L, p: L.InferenceServer(p, server_config=_cfg(L), max_batch_size=8),
     ValueError, r"server_config is mutually exclusive with the max_batch_size, static_batch_size, min_batch_size, "
                 r"timeout, collect_stats, and stats_window_size keyword arguments\."),
    ("server_config+collect_stats", lambda L, p: L.InferenceServer(p, server_config=_cfg(L), collect_stats=True),
     ValueError, r"server_config is mutually exclusive with .*keyword arguments\."),
    ("device_config+device", lambda L, p: L.InferenceServer(p, device_config=_dcfg(L), device="cpu",
                                                            policy_device="cpu"),
     ValueError, r"device_config is mutually exclusive with the explicit device keyword arguments "
                 r"\(got device, policy_device\)\."),
    ("device_config+output_device", lambda L, p: L.InferenceServer(p, device_config=_dcfg(L), output_device="cpu"),
     ValueError, r"device_config is mutually exclusive with the explicit device keyword arguments "
                 r"\(got output_device\)\."),
    ("storing_device", lambda L, p: L.InferenceServer(p, device_config=_dcfg(L, storing_device="cpu")),
     ValueError, r"storing_device is a collector-level setting that the server does not consume\. The server only "
                 r"uses policy_device and output_device \(with env_device as a fallback for output_device\)\. "
                 r"Pass storing_device to the collector instead\."),
    ("static_batch_size=str", lambda L, p: L.InferenceServer(p, static_batch_size="64"),
     TypeError, r"static_batch_size must be an integer or None\."),
    ("static_batch_size=bool", lambda L, p: L.InferenceServer(p, static_batch_size=True),
     TypeError, r"static_batch_size must be an integer or None\."),
    ("static_batch_size<max", lambda L, p: L.InferenceServer(p, static_batch_size=4, max_batch_size=8),
     ValueError, r"static_batch_size must be at least max_batch_size, got 4 and 8\."),
    ("model+policy_factory", lambda L, p: L.InferenceServer(p, policy_factory=seed_policy),
     ValueError, r"model and policy_factory are mutually exclusive\."),
    ("neither model nor factory", lambda L, p: L.InferenceServer(),
     ValueError, r"Either model or policy_factory must be provided\."),
    ("process+model", lambda L, p: L.InferenceServer(p, service_backend="process", transport_options=NOMGR),
     ValueError, r"service_backend='process' requires policy_factory so the policy is constructed in the child "
                 r"process\."),
    ("process without factory", lambda L, p: L.InferenceServer(service_backend="process", transport_options=NOMGR),
     ValueError, r"policy_factory is required for service_backend='process'\."),
    ("process bad options", lambda L, p: L.InferenceServer(policy_factory=seed_policy, service_backend="process",
                                                           transport_options=NOMGR,
                                                           service_backend_options={"foo": 1, "bar": 2}),
     ValueError, r"Unsupported process service_backend_options: \['bar', 'foo'\]\."),
    ("unsupported backend", lambda L, p: L.InferenceServer(p, service_backend="foo"),
     ValueError, r"Unsupported service backend 'foo'\. Expected one of \['direct', 'distributed', 'monarch', "
                 r"'multiprocessing', 'process', 'ray', 'rpc', 'submitit', 'thread', 'threading'\]\."),
    ("backend 'direct'", lambda L, p: L.InferenceServer(p, service_backend="direct"),
     ValueError, r"InferenceServer service_backend must be 'thread', 'process', or 'ray'\."),
    ("backend conflicts with config", lambda L, p: L.InferenceServer(
        p, service_backend="thread", server_config=_cfg(L, service_backend="process")),
     ValueError, r"service_backend conflicts with server_config\.service_backend\."),
    ("transport 'process' on thread", lambda L, p: L.InferenceServer(p, transport="process"),
     ValueError, r"transport='process' is incompatible with service_backend='thread'\."),
    ("transport 'foo'", lambda L, p: L.InferenceServer(p, transport="foo"),
     ValueError, r"transport='foo' is incompatible with service_backend='thread'\."),
    ("transport 'thread' on process", lambda L, p: L.InferenceServer(policy_factory=seed_policy,
                                                                     service_backend="process", transport="thread"),
     ValueError, r"transport='thread' is incompatible with service_backend='process'\."),
    ("response_spec without request_spec", lambda L, p: L.InferenceServer(
        p, response_spec=TensorDict({"action": torch.zeros(4)})),
     ValueError, r"response_spec requires request_spec\."),
    ("shared_memory without specs", lambda L, p: L.InferenceServer(
        policy_factory=seed_policy, service_backend="process", transport="shared_memory"),
     ValueError, r"transport='shared_memory' requires request_spec and response_spec\."),
    ("process_slot without response_spec", lambda L, p: L.InferenceServer(
        policy_factory=seed_policy, service_backend="process", transport="process_slot",
        request_spec=TensorDict({"observation": torch.zeros(8)})),
     ValueError, r"transport='process_slot' requires request_spec and response_spec\."),
    ("process distributed without specs", lambda L, p: L.InferenceServer(
        policy_factory=seed_policy, service_backend="process", transport="distributed"),
     ValueError, r"Process-owned distributed inference requires request_spec and response_spec\."),
    ("direct without num_clients", lambda L, p: L.InferenceServer(p, transport="direct"),
     ValueError, r"transport='direct' requires num_clients\."),
    ("transport_options with instance", lambda L, p: L.InferenceServer(
        p, L.ThreadingTransport(), transport_options={"x": 1}),
     ValueError, r"transport_options cannot be used with an explicit transport instance\."),
    ("service_backend_options on thread", lambda L, p: L.InferenceServer(
        p, service_backend_options={"mp_context": "spawn"}),
     ValueError, r"service_backend_options are only valid for process or Ray services\."),
    ("unknown keyword", lambda L, p: L.InferenceServer(p, foo=1),
     TypeError, r"InferenceServer\.__init__\(\) got an unexpected keyword argument 'foo'"),
    # was a gap: Python's own "takes from 1 to 3 positional arguments" message
    ("three positionals", lambda L, p: L.InferenceServer(p, "auto", 8),
     TypeError, r"InferenceServer accepts at most model and transport positionally\."),
    ("clients(0)", lambda L, p: L.InferenceServer(p).clients(0),
     ValueError, r"num_clients must be at least 1\."),
    ("clients(True)", lambda L, p: L.InferenceServer(p).clients(True),
     TypeError, r"num_clients must be an integer\."),
    ("clients('2')", lambda L, p: L.InferenceServer(p).clients("2"),
     TypeError, r"num_clients must be an integer\."),
    ("stats positional reset", lambda L, p: L.InferenceServer(p).stats(True),
     TypeError, r".*stats\(\) takes 1 positional argument but 2 were given"),
    ("PolicyClientModule max_inflight=0", lambda L, p: L.PolicyClientModule(lambda td: td, max_inflight=0),
     ValueError, r"max_inflight must be at least 1 \(got 0\); use None to disable the guard\."),
    ("PolicyClientModule bad interaction_type", lambda L, p: L.PolicyClientModule(lambda td: td,
                                                                                  interaction_type="bogus"),
     ValueError, r"'bogus' is not a valid InteractionType"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", VALIDATION, ids=[c[0] for c in VALIDATION])
def test_validation_messages(lib, policy, case):
    _, build, exc_type, message = case
    with pytest.raises(exc_type) as info:
        build(lib, policy)
    assert issubclass(info.type, exc_type)
    assert re.fullmatch(message, str(info.value)), str(info.value)


@pytest.mark.timeout(30)
def test_static_batch_size_needs_cuda_reference():
    """torchrl's side of a DIFFERENCE: static_batch_size without a CUDA policy_device is refused."""
    L = load("torchrl")
    with pytest.raises(ValueError, match=r"^static_batch_size requires an explicit CUDA policy_device\.$"):
        L.InferenceServer(seed_policy(), static_batch_size=64)


@pytest.mark.timeout(60)
def test_static_batch_size_pads_on_cpu(rls, policy):
    """DIFFERENCE (rlserve-only): static_batch_size pads CPU batches instead of being refused."""
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x[..., :4] * 2

    model = TensorDictModule(Spy(), in_keys=["observation"], out_keys=["action"])
    with rls.InferenceServer(model, static_batch_size=16, max_batch_size=8) as server:
        assert server.static_batch_size == 16
        td = obs()
        ans = call(server.client(), td)
        assert torch.allclose(ans["action"], td["observation"][:4] * 2)
    assert seen and set(seen) == {16}


# =============================================================================================
# 6. InferenceServerConfig / InferenceDeviceConfig
# =============================================================================================
def _fields(cls):
    return [(f.name, f.default) for f in dataclasses.fields(cls)]


@pytest.mark.timeout(30)
def test_config_dataclasses_match_torchrl(lib):
    ref = load("torchrl")
    assert dataclasses.is_dataclass(lib.InferenceServerConfig) and dataclasses.is_dataclass(lib.InferenceDeviceConfig)
    assert _fields(lib.InferenceServerConfig) == _fields(ref.InferenceServerConfig)
    assert _fields(lib.InferenceDeviceConfig) == _fields(ref.InferenceDeviceConfig)
    cfg = lib.InferenceServerConfig()
    assert (cfg.service_backend, cfg.max_batch_size, cfg.static_batch_size, cfg.min_batch_size, cfg.timeout,
            cfg.collect_stats, cfg.stats_window_size, cfg.max_inflight_per_env) == \
        ("thread", 64, None, 1, 0.01, True, 1024, None)
    # no other validation than torchrl's: these are accepted
    lib.InferenceServerConfig(max_batch_size=0)
    lib.InferenceServerConfig(min_batch_size=8, max_batch_size=2)
    dc = lib.InferenceDeviceConfig(policy_device="cpu", env_device="cpu")
    assert dc.policy_device == torch.device("cpu") and isinstance(dc.env_device, torch.device)
    assert dc.output_device is None and dc.server_output_device() == torch.device("cpu")
    dc2 = lib.InferenceDeviceConfig(output_device="meta", env_device="cpu")
    assert dc2.server_output_device() == torch.device("meta")
    assert lib.InferenceDeviceConfig().server_output_device() is None
    assert lib.InferenceDeviceConfig(policy_device="cuda").policy_device == torch.device("cuda")  # no ordinal


CONFIG_ERRORS = [
    ("bad backend", lambda L: L.InferenceServerConfig(service_backend="threading"), ValueError,
     r"service_backend='threading' is not supported\. Expected 'thread', 'process', or 'ray'\."),
    ("static str", lambda L: L.InferenceServerConfig(static_batch_size="8"), TypeError,
     r"static_batch_size must be an integer or None\."),
    ("static < max", lambda L: L.InferenceServerConfig(static_batch_size=8), ValueError,
     r"static_batch_size must be at least max_batch_size, got 8 and 64\."),
    ("max_inflight_per_env 0", lambda L: L.InferenceServerConfig(max_inflight_per_env=0), ValueError,
     r"max_inflight_per_env must be at least 1 \(got 0\); use None to disable the guard\."),
    ("bad device string", lambda L: L.InferenceDeviceConfig(policy_device="nope"), RuntimeError,
     r"Expected one of .* device type at start of device string: nope"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_post_init_errors(lib, case):
    _, build, exc_type, message = case
    with pytest.raises(exc_type) as info:
        build(lib)
    assert issubclass(info.type, exc_type)
    assert re.fullmatch(message, str(info.value), flags=re.S), str(info.value)


@pytest.mark.timeout(60)
def test_configs_reach_the_server(lib, policy):
    cfg = lib.InferenceServerConfig(max_batch_size=3, min_batch_size=2, timeout=0.4, stats_window_size=16)
    dcfg = lib.InferenceDeviceConfig(policy_device="cpu", env_device="cpu")
    server = lib.InferenceServer(policy, server_config=cfg, device_config=dcfg)
    assert server.max_batch_size == 3 and server.stats_window_size == 16 and server.collect_stats is True
    assert server.policy_device == torch.device("cpu") and server.device == torch.device("cpu")
    assert server.output_device == torch.device("cpu")
    with server:
        client = server.client()
        t0 = time.monotonic()
        ans = call(client, obs())  # min_batch_size=2: a lone request waits for the timeout window
        waited = time.monotonic() - t0
        assert waited >= 0.3, f"a lone request was served after {waited:.3f} s despite min_batch_size=2"
        assert ans["action"].shape == (4,)
        server.stats(reset=True)
        futs = [client.submit(obs()) for _ in range(2)]  # two pending: one batch of 2, no waiting
        for f in futs:
            f.result(timeout=T)
        st = server.stats()
        assert st["requests"] == 2 and st["batches"] == 1 and st["avg_batch_size"] == 2.0


@pytest.mark.timeout(30)
def test_server_public_attributes(lib, policy):
    """Every public attribute of torchrl's thread server exists, with the same values.
    Was a gap: ``min_batch_size`` / ``timeout`` were only in ``server.batching``."""
    server = lib.InferenceServer(policy, max_batch_size=5, min_batch_size=2, timeout=0.2, collect_stats=False,
                                 stats_window_size=7, policy_device="cpu")
    missing = [a for a in TORCHRL_SERVER_ATTRS if not hasattr(server, a)]
    assert not missing, f"{lib.name} InferenceServer lacks torchrl attributes {missing}"
    assert server.model is policy
    assert (server.max_batch_size, server.min_batch_size, server.timeout, server.static_batch_size) == (5, 2, 0.2, None)
    assert (server.collect_stats, server.stats_window_size) == (False, 7)
    assert server.policy_device == torch.device("cpu") and server.output_device is None
    assert server.weight_sync is None and server.policy_version_key == "policy_version"
    assert server.collate_fn is None or callable(server.collate_fn)


# =============================================================================================
# 7. Methods of the thread server
# =============================================================================================
@pytest.mark.timeout(60)
def test_clients_and_stats(lib, policy):
    with lib.InferenceServer(policy) as server:
        clients = server.clients(3)
        assert isinstance(clients, list) and len(clients) == 3
        assert len({id(c) for c in clients}) == 3
        for c in clients:
            td = obs()
            assert torch.allclose(call(c, td)["action"], expected(policy, td), atol=1e-6)
        st = server.stats()
        assert TORCHRL_STATS_KEYS <= set(st), f"missing torchrl stats keys {TORCHRL_STATS_KEYS - set(st)}"
        if lib.name == "torchrl":
            assert set(st) == TORCHRL_STATS_KEYS  # the reference key set really is these 11
        assert st["requests"] == 3 and st["batches"] >= 1 and st["policy_version"] == 0
        assert st["weight_updates"] == 0 and st["avg_batch_size"] > 0
        for k in ("requests_per_s", "batches_per_s", "p50_queue_ms", "p95_queue_ms", "p50_forward_ms",
                  "p95_forward_ms"):
            assert isinstance(st[k], float) and st[k] >= 0.0, k
        snap = server.stats(reset=True)
        assert snap["requests"] == 3  # reset returns the snapshot, then clears
        after = server.stats()
        assert after["requests"] == 0 and after["batches"] == 0 and after["avg_batch_size"] == 0.0
        call(clients[0], obs())
        assert server.stats()["requests"] == 1
    server2 = lib.InferenceServer(policy, collect_stats=False)
    with server2:
        call(server2.client(), obs())
        st = server2.stats()
        assert TORCHRL_STATS_KEYS <= set(st) and st["requests"] == 0 and st["batches"] == 0


@pytest.mark.timeout(60)
def test_update_model(lib, policy):
    with lib.InferenceServer(policy) as server:
        client = server.client()
        td = obs()
        before = call(client, td)
        seen = []

        def zero(model):
            seen.append(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            return "done"

        assert server.update_model(zero) == "done"
        assert seen == [server.model]
        assert server.policy_version == 1
        after = call(client, td)
        assert version_of(before) == 0 and version_of(after) == 1
        assert torch.count_nonzero(after["action"]) == 0
        assert server.stats()["weight_updates"] == 1

        class Boom(Exception):
            pass

        def fail(model):
            raise Boom("no")

        with pytest.raises(Boom):
            server.update_model(fail)
        assert server.policy_version == 1
        assert server.update_model(lambda m: 7, mark_weight_update=False) == 7
        assert server.policy_version == 1
        server.update_policy_weights_()
        assert server.policy_version == 2
        assert version_of(call(client, td)) == 2
        assert server.stats()["weight_updates"] == 2


@pytest.mark.timeout(30)
def test_update_policy_weights_applies_nothing_reference(policy):
    """torchrl's side of a DIFFERENCE: update_policy_weights_(weights) only bumps the version."""
    L = load("torchrl")
    with L.InferenceServer(policy) as server:
        td = obs()
        before = call(server.client(), td)
        server.update_policy_weights_(None, zero_policy_weights(policy))
        after = call(server.client(), td)
        assert version_of(after) == 1
        assert torch.allclose(after["action"], before["action"])  # nothing applied


@pytest.mark.timeout(30)
def test_update_policy_weights_applies_weights(rls, policy):
    """DIFFERENCE (rlserve-only): update_policy_weights_ applies the given weights, then bumps."""
    with rls.InferenceServer(policy) as server:
        td = obs()
        server.update_policy_weights_(None, zero_policy_weights(policy))
        ans = call(server.client(), td)
        assert version_of(ans) == 1 and torch.count_nonzero(ans["action"]) == 0
        server.update_policy_weights_(policy_or_weights=shifted_weights(seed_policy()))
        ans = call(server.client(), td)
        assert version_of(ans) == 2
        ref = seed_policy()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.5)
        assert torch.allclose(ans["action"], expected(ref, td), atol=1e-5)


@pytest.mark.timeout(60)
def test_lifecycle_and_restart(lib, policy):
    server = lib.InferenceServer(policy)
    assert not server.is_alive and server.transport_kind == "thread" and server.service_backend == "thread"
    server.shutdown()  # a no-op before start
    server.start()
    try:
        assert server.is_alive
        with pytest.raises(RuntimeError, match=r"^Server is already running\.$"):
            server.start()
        client = server.client()
        call(client, obs())
        server.update_model(lambda m: None)
        server.shutdown()
        assert not server.is_alive
        server.shutdown()  # idempotent
        assert server.start() is server
        assert server.is_alive
        td = obs()
        ans = call(client, td)  # a client made before the restart still works
        assert torch.allclose(ans["action"], expected(policy, td), atol=1e-6)
        assert version_of(ans) == 1 and server.policy_version == 1  # the version survives the restart
        assert server.stats()["requests"] == 2  # ... and the stats
    finally:
        server.shutdown()


@pytest.mark.timeout(30)
def test_requests_after_shutdown_raise(rls, policy):
    """DIFFERENCE (rlserve-only): torchrl's call after shutdown() hangs forever; rlserve raises."""
    server = rls.InferenceServer(policy).start()
    client = server.client()
    call(client, obs())
    server.shutdown()
    with pytest.raises(rls.M.ServerClosedError):
        client(obs(), timeout=5)
    with pytest.raises(RuntimeError):  # ServerClosedError is a RuntimeError, like torchrl's lifecycle errors
        client.submit(obs()).result(timeout=5)


@pytest.mark.timeout(30)
def test_bad_request_fails_whole_batch_reference(policy):
    """torchrl's side of a DIFFERENCE: one bad request fails every request of its batch."""
    L = load("torchrl")
    transport = L.ThreadingTransport()
    client = transport.client()
    good = [client.submit(obs()) for _ in range(3)]
    bad = client.submit(TensorDict({"observation": torch.randn(5)}))
    with L.InferenceServer(policy, transport, max_batch_size=8):
        for f in good + [bad]:
            with pytest.raises(Exception):
                f.result(timeout=T)


@pytest.mark.timeout(30)
def test_bad_request_fails_alone(rls, policy):
    """DIFFERENCE (rlserve-only): only the bad request of a batch fails."""
    transport = rls.ThreadingTransport()
    client = transport.client()
    tds = [obs() for _ in range(3)]
    good = [client.submit(td) for td in tds]
    bad = client.submit(TensorDict({"observation": torch.randn(5)}))
    missing = client.submit(TensorDict({"other": torch.randn(8)}))
    with rls.InferenceServer(policy, transport, max_batch_size=8):
        for td, f in zip(tds, good):
            assert torch.allclose(f.result(timeout=T)["action"], expected(policy, td), atol=1e-6)
        for f in (bad, missing):
            with pytest.raises(rls.M.RequestError):  # a ValueError and a RuntimeError (RLServeError)
                f.result(timeout=T)


@pytest.mark.timeout(30)
def test_mixed_layouts_grouped(rls, doubler):
    """DIFFERENCE (rlserve-only): requests of different shapes in one drain run as separate groups."""
    transport = rls.ThreadingTransport()
    client = transport.client()
    tds = [TensorDict({"observation": torch.randn(4)}), TensorDict({"observation": torch.randn(5)}),
           TensorDict({"observation": torch.randn(3, 2)})]
    futs = [client.submit(td) for td in tds]
    with rls.InferenceServer(doubler, transport, max_batch_size=8):
        for td, f in zip(tds, futs):
            assert torch.allclose(f.result(timeout=T)["action"], td["observation"] * 2)


@pytest.mark.timeout(30)
def test_batching_arguments_checked(rls, policy):
    """DIFFERENCE (rlserve-only): torchrl accepts max_batch_size=0 (then never serves) and
    min_batch_size > max_batch_size; rlserve refuses both at construction."""
    with pytest.raises(ValueError, match="max_batch_size"):
        rls.InferenceServer(policy, max_batch_size=0)
    with pytest.raises(ValueError, match="min_batch_size"):
        rls.InferenceServer(policy, min_batch_size=4, max_batch_size=2)
    load("torchrl").InferenceServer(policy, min_batch_size=4, max_batch_size=2)  # the reference accepts it


@pytest.mark.timeout(30)
def test_no_second_loop_after_timed_out_shutdown(rls):
    """DIFFERENCE (rlserve-only): torchrl's start() after a shutdown(timeout) that timed out runs a
    second serving loop beside the first; rlserve refuses until the first has finished its batch."""
    from helpers import slow_doubler

    server = rls.InferenceServer(slow_doubler(0.6)).start()
    fut = server.client().submit(TensorDict({"observation": torch.ones(2)}))
    time.sleep(0.2)  # the batch is running
    server.shutdown(timeout=0.01)
    with pytest.raises(RuntimeError):
        server.start()
    assert torch.equal(fut.result(timeout=T)["action"], torch.full((2,), 2.0))
    wait_until(lambda: not any(t.name == server.name and t.is_alive() for t in threading.enumerate()),
               what="the first loop to end")
    server.start()
    try:
        assert torch.equal(call(server.client(), TensorDict({"observation": torch.ones(2)}))["action"],
                           torch.full((2,), 2.0))
        assert sum(t.name == server.name for t in threading.enumerate()) == 1
    finally:
        server.shutdown()


@pytest.mark.timeout(30)
def test_clients_are_tensordict_modules(rls, policy):
    """DIFFERENCE (rlserve-only): every client is a TensorDictModuleBase (torchrl's InferenceClient is
    a plain class), so it goes wherever a torchrl policy module goes (TensorDictSequential, ...)."""
    from tensordict.nn import TensorDictModuleBase, TensorDictSequential

    assert not issubclass(load("torchrl").InferenceClient, TensorDictModuleBase)
    with rls.InferenceServer(policy) as server:
        client = server.client()
        assert isinstance(client, TensorDictModuleBase)
        seq = TensorDictSequential(client)
        td = obs()
        assert torch.allclose(seq(td.clone())["action"], expected(policy, td), atol=1e-6)


@pytest.mark.timeout(30)
def test_thread_server_health(rls, policy):
    """DIFFERENCE (rlserve-only): the thread server has health() as the other owners."""
    server = rls.InferenceServer(policy)
    assert server.health() == {"is_alive": False, "policy_version": 0, "transport": "thread"}
    with server:
        assert server.health()["is_alive"] is True
    assert not hasattr(load("torchrl").InferenceServer(policy), "health")


# =============================================================================================
# 8. PolicyClientModule
# =============================================================================================
@pytest.mark.timeout(60)
def test_policy_client_module_wraps(lib, policy):
    transport = lib.ThreadingTransport()
    with lib.InferenceServer(policy, transport) as server:
        for source in (transport, server, server.client()):
            pcm = lib.PolicyClientModule(source, in_keys=["observation"], out_keys=["action", "policy_version"])
            assert isinstance(pcm, nn.Module)
            assert pcm.in_keys == ["observation"] and pcm.out_keys == ["action", "policy_version"]
            assert pcm.max_inflight is None and pcm.interaction_type is None
            td = obs()
            before = td.clone()
            out = pcm(td)
            assert out is not td
            assert set(td.keys()) == {"observation"} and torch.equal(td["observation"], before["observation"])
            assert torch.allclose(out["action"], expected(policy, td), atol=1e-6) and version_of(out) == 0
            out2 = pcm.submit(td).result(timeout=T)
            assert torch.allclose(out2["action"], out["action"])
            assert MARKER not in out.keys() and MARKER not in out2.keys()
        bare = lib.PolicyClientModule(transport)
        assert bare.in_keys == [] and bare.out_keys == []
        for s in ("Deterministic", "random", InteractionType.MODE):
            assert lib.PolicyClientModule(transport, interaction_type=s).interaction_type == InteractionType(
                s.lower() if isinstance(s, str) else s)
        guarded = lib.PolicyClientModule(transport, max_inflight=2)
        assert guarded.max_inflight == 2
        futs = [guarded.submit(obs()) for _ in range(2)]
        for f in futs:
            f.result(timeout=T)
        guarded.submit(obs()).result(timeout=T)  # slots are given back


@pytest.mark.timeout(60)
def test_policy_client_module_interaction_type(lib):
    policy = gaussian_policy()
    with lib.InferenceServer(policy) as server:
        det = lib.PolicyClientModule(server, interaction_type="deterministic")
        rnd = lib.PolicyClientModule(server, interaction_type="random")
        td = obs()
        d = [det(td) for _ in range(3)]
        for ans in d:
            assert torch.allclose(ans["action"], ans["loc"]) and torch.allclose(ans["action"], d[0]["action"])
            assert MARKER not in ans.keys()
        r = [rnd(td) for _ in range(3)]
        for ans in r:
            assert not torch.allclose(ans["action"], ans["loc"])
            assert MARKER not in ans.keys()
        assert not torch.allclose(r[0]["action"], r[1]["action"])
        assert torch.allclose(r[0]["loc"], d[0]["loc"])


@pytest.mark.timeout(30)
def test_mixed_interaction_types_rejected_reference():
    """torchrl's side of a DIFFERENCE: a batch mixing interaction types fails as a whole."""
    L = load("torchrl")
    with L.InferenceServer(gaussian_policy(), min_batch_size=2, timeout=1.0) as server:
        det = L.PolicyClientModule(server, interaction_type="deterministic")
        rnd = L.PolicyClientModule(server, interaction_type="random")
        futs = [det.submit(obs()), rnd.submit(obs())]
        for f in futs:
            with pytest.raises(RuntimeError, match="mixed interaction-type batch"):
                f.result(timeout=T)


@pytest.mark.timeout(30)
def test_mixed_interaction_types_grouped(rls):
    """DIFFERENCE (rlserve-only): concurrent requests of different interaction types are each served
    under their own type; no marker key in any answer (also with an unstamped raw client)."""
    with rls.InferenceServer(gaussian_policy(), min_batch_size=3, timeout=2.0) as server:
        det = rls.PolicyClientModule(server, interaction_type="deterministic")
        rnd = rls.PolicyClientModule(server, interaction_type="random")
        raw = server.client()
        f_det, f_rnd, f_raw = det.submit(obs()), rnd.submit(obs()), raw.submit(obs())
        a_det, a_rnd, a_raw = (f.result(timeout=T) for f in (f_det, f_rnd, f_raw))
        assert torch.allclose(a_det["action"], a_det["loc"])
        assert not torch.allclose(a_rnd["action"], a_rnd["loc"])
        assert not torch.allclose(a_raw["action"], a_raw["loc"])  # unstamped: the module's own default (RANDOM)
        for a in (a_det, a_rnd, a_raw):
            assert MARKER not in a.keys()


# =============================================================================================
# 9. MPTransport: a spawned actor; ctx=
# =============================================================================================
@pytest.mark.timeout(120)
def test_mp_transport_manager_spawned_actor(lib, policy):
    transport = lib.MPTransport(use_manager=True)
    server = lib.InferenceServer(policy, transport).start()
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    try:
        client = transport.client()  # after start: allowed with a manager-backed transport
        p = ctx.Process(target=mp_child_call, args=(client, out_q))
        p.start()
        got = out_q.get(timeout=T_PROC)
        p.join(T)
        assert got[0] == "ok", got
        _, shape, version, ob, act = got
        assert shape == (2,) or shape == (4,)
        td = TensorDict({"observation": torch.tensor(ob)})
        assert torch.allclose(torch.tensor(act), expected(policy, td), atol=1e-5) and version == 0
        assert p.exitcode == 0
        assert server.transport_kind == "process"
    finally:
        server.shutdown()
        close_transport(transport)


@pytest.mark.timeout(60)
def test_mp_transport_ctx(lib, policy):
    transport = lib.MPTransport(ctx=mp.get_context("spawn"))
    client = transport.client()
    assert callable(client) and hasattr(client, "submit")
    with lib.InferenceServer(policy, transport) as server:
        assert server.transport_kind == "process"
        td = obs()
        ans = client(td, timeout=T)
        assert torch.allclose(ans["action"], expected(policy, td), atol=1e-6) and version_of(ans) == 0
        if lib.name == "torchrl":
            with pytest.raises(RuntimeError, match=r"^MPTransport\.submit\(\) is not supported\. Call "
                                                   r"transport\.client\(\) to create a client\.$"):
                transport.submit(obs())
        else:  # DIFFERENCE: rlserve's MPTransport also takes submit() in the serving process
            assert torch.allclose(transport.submit(td).result(timeout=T)["action"], ans["action"])


# =============================================================================================
# 10. service_backend="process"
# =============================================================================================
@pytest.mark.timeout(180)
def test_process_backend(lib):
    server = lib.InferenceServer(policy_factory=seed_policy, service_backend="process", max_batch_size=8)
    ref = seed_policy()
    try:
        assert isinstance(server, lib.ProcessInferenceServer)
        assert server.service_backend == "process" and server.transport_kind == "process"
        assert not server.is_alive
        client = server.client()
        assert server.client() is client  # the same client every call
        td = obs()
        early = client.submit(td)  # scenario 3: submitted before start, served once the child runs
        server.start()
        assert server.is_alive
        assert torch.allclose(early.result(timeout=T_PROC)["action"], expected(ref, td), atol=1e-6)
        ans = client(td, timeout=T)
        assert torch.allclose(ans["action"], expected(ref, td), atol=1e-6) and version_of(ans) == 0
        more = server.clients(2)
        assert len(more) == 2 and all(c is not client for c in more)
        for c in more:
            assert torch.allclose(c(td, timeout=T)["action"], ans["action"])
        with pytest.raises(ValueError, match=r"^num_clients must be at least 1\.$"):
            server.clients(0)
        st = server.stats()
        assert TORCHRL_STATS_KEYS <= set(st) and st["requests"] == 4
        h = server.health()
        assert {"process_alive", "pid", "exitcode", "alive", "policy_version"} <= set(h)
        assert h["process_alive"] is True and h["alive"] is True and h["policy_version"] == 0
        assert isinstance(h["pid"], int) and h["exitcode"] is None
        res = server.update_model_weights(zero_policy_weights(ref))
        assert res == {"accepted": True}
        ans = client(td, timeout=T)
        assert torch.count_nonzero(ans["action"]) == 0 and version_of(ans) == 1
        assert server.policy_version == 1 and server.stats()["weight_updates"] == 1
        # mark_weight_update=False: the weights apply, the version stays (found in review: rlserve bumped it)
        server.update_model_weights(TensorDict.from_module(ref).data.clone(), mark_weight_update=False)
        ans = client(td, timeout=T)
        assert torch.allclose(ans["action"], expected(ref, td), atol=1e-6) and version_of(ans) == 1
        server.update_model_weights(zero_policy_weights(ref), mark_weight_update=False)
        assert server.policy_version == 1 and server.stats()["weight_updates"] == 1
        server.shutdown()
        assert not server.is_alive
        h = server.health()
        assert h["process_alive"] is False
        server.start()  # restart: a fresh child
        assert server.is_alive
        ans = server.clients(1)[0](td, timeout=T_PROC)
        assert ans["action"].shape == (4,)
        if lib.name == "rlserve":  # DIFFERENCE: torchrl rebuilds from policy_factory (weights lost, version 0)
            assert torch.count_nonzero(ans["action"]) == 0 and version_of(ans) == 1
        else:
            assert torch.allclose(ans["action"], expected(ref, td), atol=1e-6) and version_of(ans) == 0
        # the client made before the restart (server.client() hands out that same object) still works.
        # was a gap: the cached client remembered the shutdown; now it registers with the restarted server
        again = client(td, timeout=T)
        assert torch.allclose(again["action"], ans["action"]) and version_of(again) == version_of(ans)
    finally:
        server.shutdown()
        close_transport(server.transport)


# =============================================================================================
# 11. SlotTransport, SharedMemoryTransport, ProcessSlotTransport
# =============================================================================================
@pytest.mark.timeout(60)
def test_slot_transport_direct(lib, policy):
    server = lib.InferenceServer(policy, transport="direct", num_clients=2)
    assert isinstance(server.transport, lib.SlotTransport) and server.transport_kind == "direct"
    with server:
        c1, c2 = server.clients(2)
        td = obs()
        assert torch.allclose(c1(td)["action"], expected(policy, td), atol=1e-6)
        assert torch.allclose(call(c2, td)["action"], expected(policy, td), atol=1e-6)
        with pytest.raises(RuntimeError, match=r"^SlotTransport has 2 slots but client\(\) was called 3 times\. "
                                               r"Create a SlotTransport with more slots\.$"):
            server.client()
        with pytest.raises(NotImplementedError, match=r"^SlotTransport does not support submit\(\)\. Use client\(\) "
                                                      r"to obtain a slot-bound callable\.$"):
            server.transport.submit(td)
    tr = lib.SlotTransport(1)
    with lib.InferenceServer(policy, tr):
        assert call(tr.client(), td)["action"].shape == (4,)


SPEC_REQ = TensorDict({"observation": torch.zeros(8)})
SPEC_RESP = TensorDict({"action": torch.zeros(4), "policy_version": torch.zeros((), dtype=torch.long)})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["SharedMemoryTransport", "ProcessSlotTransport"])
def test_spec_transports(lib, policy, kind):
    cls = getattr(lib, kind)
    transport = cls(SPEC_REQ, SPEC_RESP, num_slots=2)
    c1, c2 = transport.client(), transport.client()
    td = obs()
    if kind == "ProcessSlotTransport":
        with pytest.raises(RuntimeError, match=r"^ProcessSlotTransport has 2 slots but client\(\) was called "
                                               r"3 times\.$"):
            transport.client()
        with pytest.raises(NotImplementedError, match=r"^ProcessSlotTransport does not support submit\(\)\. Call "
                                                      r"client\(\) to obtain a fixed-slot client\.$"):
            transport.submit(td)
    elif lib.name == "torchrl":
        with pytest.raises(RuntimeError, match=r"^SharedMemoryTransport\.submit\(\) is not supported\. Call "
                                               r"transport\.client\(\) to create a client\.$"):
            transport.submit(td)
    with lib.InferenceServer(policy, transport, max_batch_size=4) as server:
        res = c1(td)
        assert set(res.keys()) == {"action", "policy_version"}  # only the response spec's keys travel
        assert torch.allclose(res["action"], expected(policy, td), atol=1e-6) and version_of(res) == 0
        res2 = call(c2, TensorDict({"observation": td["observation"], "extra": torch.ones(3)}))
        assert torch.allclose(res2["action"], res["action"])  # extra keys are dropped, not refused
        assert c1(td, timeout=T)["action"].shape == (4,)
        # was a gap: a ProcessSlotTransport (a SharedMemoryTransport subclass) reported "shared_memory"
        assert server.transport_kind == ("shared_memory" if kind == "SharedMemoryTransport" else "process_slot")
        if kind == "SharedMemoryTransport":
            # num_slots bounds requests in flight, not clients: more clients than slots take turns.
            # was a gap: num_slots was taken for a client limit
            more = [transport.client() for _ in range(2)]
            for c in more:
                assert torch.allclose(c(td, timeout=T)["action"], res["action"])


SPEC_ERRORS = [
    # id, kwargs, exception, message template ({cls} = the class name)
    ("num_slots=0 shm", "SharedMemoryTransport", dict(num_slots=0), ValueError,
     r"num_slots must be a positive integer, got 0\."),
    # was a gap: ProcessSlotTransport said SharedMemoryTransport's message
    ("num_slots=0 slot", "ProcessSlotTransport", dict(num_slots=0), ValueError, r"num_slots must be positive, got 0\."),
    ("num_slots=True slot", "ProcessSlotTransport", dict(num_slots=True), TypeError, r"num_slots must be an integer\."),
    ("empty request_spec", None, dict(num_slots=1, request_spec=TensorDict({})), ValueError,
     r"request_spec must contain at least one tensor leaf\."),
    ("non-tensor leaf", None, dict(num_slots=1, request_spec=TensorDict({"observation": torch.zeros(8),
                                                                         "s": NonTensorData("x")})),
     TypeError, r"{cls} specs only support tensor leaves; request_spec has a NonTensorData at key 's'\. "
                r"Encode small metadata as tensors or use MPTransport\."),
    ("meta device leaf", None, dict(num_slots=1, response_spec=TensorDict({"action": torch.zeros(4, device="meta")})),
     ValueError, r"{cls} slots live in CPU shared memory; response_spec has a meta tensor at key 'action'\."),
]


SPEC_ERROR_CASES = [(kind, c) for c in SPEC_ERRORS for kind in ("SharedMemoryTransport", "ProcessSlotTransport")
                    if c[1] in (None, kind)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind,case", SPEC_ERROR_CASES, ids=[f"{k}-{c[0]}" for k, c in SPEC_ERROR_CASES])
def test_spec_transport_errors(lib, kind, case):
    _, _, kwargs, exc_type, message = case
    kw = dict(request_spec=SPEC_REQ, response_spec=SPEC_RESP)
    kw.update(kwargs)
    with pytest.raises(exc_type) as info:
        getattr(lib, kind)(kw.pop("request_spec"), kw.pop("response_spec"), **kw)
    assert issubclass(info.type, exc_type)
    assert re.fullmatch(message.format(cls=kind), str(info.value)), str(info.value)


TIMEOUT_KINDS = ["MPTransport", "SharedMemoryTransport", "ProcessSlotTransport"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", TIMEOUT_KINDS)
def test_client_timeout_raises_queue_empty(lib, kind):
    """torchrl's Mailbox / SharedMemory / ProcessSlot clients signal a timeout with queue.Empty, so
    torchrl code catches that: no server serves the transport here, the call must time out so.
    Was a gap: a plain TimeoutError, which ``except queue.Empty`` does not catch (rlserve's
    AnswerTimeout is both)."""
    transport = lib.MPTransport() if kind == "MPTransport" else getattr(lib, kind)(SPEC_REQ, SPEC_RESP, num_slots=1)
    client = transport.client()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        client(obs(), timeout=0.3)
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(30)
def test_future_timeout_raises_timeout_error(lib, policy):
    """Thread and slot futures: result(timeout) raises TimeoutError (concurrent.futures' is the builtin)."""
    for transport in (lib.ThreadingTransport(), lib.SlotTransport(1)):
        fut = transport.client().submit(obs())
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.2)
        with lib.InferenceServer(policy, transport):  # then served: the request was only late
            assert fut.result(timeout=T)["action"].shape == (4,)


@pytest.mark.timeout(30)
def test_shm_transport_drops_interaction_type_reference():
    """torchrl's side of a DIFFERENCE: over SharedMemoryTransport a PolicyClientModule's
    interaction_type is lost (the model runs under its own default, RANDOM here)."""
    L = load("torchrl")
    resp = TensorDict({"action": torch.zeros(2), "loc": torch.zeros(2),
                       "policy_version": torch.zeros((), dtype=torch.long)})
    transport = L.SharedMemoryTransport(SPEC_REQ, resp, num_slots=1)
    det = L.PolicyClientModule(transport.client(), interaction_type="deterministic")
    with L.InferenceServer(gaussian_policy(), transport):
        ans = det.submit(obs()).result(timeout=T)
        assert not torch.allclose(ans["action"], ans["loc"])


@pytest.mark.timeout(30)
def test_shm_transport_carries_interaction_type(rls):
    """DIFFERENCE (rlserve-only): a PolicyClientModule's interaction_type holds over SharedMemoryTransport."""
    resp = TensorDict({"action": torch.zeros(2), "loc": torch.zeros(2),
                       "policy_version": torch.zeros((), dtype=torch.long)})
    transport = rls.SharedMemoryTransport(SPEC_REQ, resp, num_slots=2)
    det = rls.PolicyClientModule(transport.client(), interaction_type="deterministic")
    rnd = rls.PolicyClientModule(transport.client(), interaction_type="random")
    with rls.InferenceServer(gaussian_policy(), transport):
        for _ in range(2):
            a = det(obs())
            assert torch.allclose(a["action"], a["loc"]) and MARKER not in a.keys()
            b = rnd(obs())
            assert not torch.allclose(b["action"], b["loc"]) and MARKER not in b.keys()


# =============================================================================================
# 12. torchrl weight-sync schemes as weight_sync=
# =============================================================================================


@pytest.mark.timeout(60)
def test_user_scheme_thread_server(lib, policy):
    scheme = QueueScheme()
    with lib.InferenceServer(policy, weight_sync=scheme, weight_sync_model_id="actor") as server:
        client = server.client()
        td = obs()
        assert version_of(call(client, td)) == 0
        assert scheme.calls[:2] == ["init_on_receiver", "connect"] and scheme.model_id == "actor"
        assert scheme.initialized_on_receiver and scheme.synchronized_on_receiver
        scheme.send(zero_policy_weights(policy))
        ans = wait_until(lambda: (lambda a: a if version_of(a) == 1 else None)(call(client, td)),
                         what="the scheme's weights to be served")
        assert torch.count_nonzero(ans["action"]) == 0
        assert server.policy_version == 1 and server.stats()["weight_updates"] == 1
        scheme.send(shifted_weights(seed_policy()))
        ans = wait_until(lambda: (lambda a: a if version_of(a) == 2 else None)(call(client, td)),
                         what="the second set of weights")
        assert torch.count_nonzero(ans["action"]) > 0
    assert scheme.calls.count("init_on_receiver") == 1


@pytest.mark.timeout(60)
def test_no_weight_sync_scheme(lib, policy):
    from torchrl.weight_update import NoWeightSyncScheme

    with lib.InferenceServer(policy, weight_sync=NoWeightSyncScheme()) as server:
        td = obs()
        for _ in range(3):
            ans = call(server.client(), td)
            assert torch.allclose(ans["action"], expected(policy, td), atol=1e-6) and version_of(ans) == 0
        assert server.policy_version == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scheme_name", ["SharedMemWeightSyncScheme", "MultiProcessWeightSyncScheme"])
def test_torchrl_scheme_process_server(lib, scheme_name):
    """ex14b: a torchrl scheme pickled into a ProcessInferenceServer; send() updates the served weights."""
    import torchrl.weight_update as wu

    training_model = seed_policy()
    scheme = getattr(wu, scheme_name)()
    scheme.init_on_sender(model=training_model, devices=[torch.device("cpu")])
    transport = lib.MPTransport()
    client = transport.client()
    server = lib.ProcessInferenceServer(policy_factory=seed_policy, transport=transport, weight_sync=scheme)
    try:
        scheme.connect()
        server.start()
        td = obs()
        old = client(td, timeout=T_PROC)
        v0 = version_of(old)
        time.sleep(0.3)
        again = client(td, timeout=T)
        # was a gap: receive(timeout=0.0) was polled on these schemes (torchrl does not): the version moved
        # every idle tick (SharedMem), or the serve loop died of queue.Empty (MultiProcess)
        assert version_of(again) == v0, "policy_version moved although nothing was sent"
        with torch.no_grad():
            for p in training_model.parameters():
                p.add_(0.25)
        want = expected(training_model, td)
        stale = client(td, timeout=T)
        assert version_of(stale) == v0
        if lib.name == "rlserve":  # DIFFERENCE: the trainer's in-place change is not served before send()
            assert torch.allclose(stale["action"], old["action"]), "unsent trainer weights reached inference"
        else:  # torchrl's documented defect: the served model aliases the trainer's shared parameters
            assert torch.allclose(stale["action"], want, atol=1e-5)
        if scheme_name == "MultiProcessWeightSyncScheme":
            scheme.send(weights=TensorDict.from_module(training_model).data)
        else:
            scheme.send()
        ans = wait_until(lambda: (lambda a: a if version_of(a) > v0 else None)(client(td, timeout=T)),
                         what="the sent weights to be served")
        assert torch.allclose(ans["action"], want, atol=1e-5)
        assert version_of(ans) == v0 + 1, f"one send() moved the version from {v0} to {version_of(ans)}"
        time.sleep(0.3)
        assert version_of(client(td, timeout=T)) == v0 + 1
        assert server.policy_version == version_of(ans)
    finally:
        server.shutdown()
        scheme.shutdown()


# =============================================================================================
# 13. A client / PolicyClientModule as a torchrl policy (rollout, Collector)
# =============================================================================================
@pytest.mark.timeout(90)
@pytest.mark.parametrize("wrap", ["client", "module"])
def test_torchrl_rollout_and_collector(lib, wrap):
    pytest.importorskip("gymnasium")
    from torchrl.collectors import Collector
    from torchrl.envs import GymEnv

    policy = cartpole_policy()
    with lib.InferenceServer(policy, max_batch_size=8) as server:
        actor = server.client() if wrap == "client" else lib.PolicyClientModule(
            server, in_keys=["observation"], out_keys=["action"])
        env = GymEnv("CartPole-v1")
        try:
            env.set_seed(0)
            roll = env.rollout(max_steps=10, policy=actor, break_when_any_done=False)
            assert roll.batch_size == torch.Size([10])
            assert roll["action"].shape == (10, 2) and bool((roll["action"].sum(-1) == 1).all())
            assert torch.equal(roll["action"], expected(policy, roll.select("observation")).to(roll["action"].dtype))
            assert (roll["policy_version"] == 0).all()
        finally:
            env.close()
        collector = Collector(lambda: GymEnv("CartPole-v1"), actor, frames_per_batch=20, total_frames=40)
        try:
            frames = 0
            for batch in collector:
                assert batch.numel() == 20 and batch["action"].shape[-1] == 2
                assert ("next", "observation") in batch.keys(True)
                frames += batch.numel()
            assert frames == 40
        finally:
            collector.shutdown()
        assert server.stats()["requests"] >= 50


# =============================================================================================
# 14. torchrl.service_backend(...) / torchrl.transport_backend(...) contexts
# =============================================================================================
@pytest.mark.timeout(120)
def test_backend_contexts_select_process_owner(lib):
    from torchrl import service_backend, transport_backend

    with service_backend("process"), transport_backend("process"):
        server = lib.InferenceServer(policy_factory=seed_policy)
    try:
        assert isinstance(server, lib.ProcessInferenceServer)
        assert server.service_backend == "process" and server.transport_kind == "process"
        server.start()
        td = obs()
        ans = server.client()(td, timeout=T_PROC)
        assert torch.allclose(ans["action"], expected(seed_policy(), td), atol=1e-6)
    finally:
        server.shutdown()
        close_transport(server.transport)


@pytest.mark.timeout(30)
def test_backend_contexts_thread(lib, policy):
    from torchrl import service_backend, transport_backend

    with service_backend("thread"), transport_backend("direct"):
        server = lib.InferenceServer(policy, num_clients=1)
    assert server.transport_kind == "direct" and server.service_backend == "thread"
    with transport_backend("queue"):
        assert lib.InferenceServer(policy).transport_kind == "thread"
    got = {}
    with transport_backend("process"):
        assert lib.InferenceServer(policy, transport="thread").transport_kind == "thread"  # explicit wins
        with pytest.raises(ValueError) as info:
            lib.InferenceServer(policy)
        got["transport context"] = str(info.value)
    with service_backend("direct"):
        with pytest.raises(ValueError) as info:
            lib.InferenceServer(policy)
        got["service context"] = str(info.value)
    # was a gap: the "(selected by an enclosing ... context.)" suffixes
    assert got == {
        "transport context": "transport='process' is incompatible with service_backend='thread'. "
                             "(selected by an enclosing torchrl.transport_backend context.)",
        "service context": "InferenceServer service_backend must be 'thread', 'process', or 'ray'. "
                           "(selected by an enclosing torchrl.service_backend context.)",
    }


# =============================================================================================
# Ray (skipped where Ray is not installed)
# =============================================================================================
@pytest.mark.timeout(120)
def test_ray_service_backend(lib, ray_local):
    server = lib.InferenceServer(policy_factory=seed_policy, service_backend="ray",
                                 service_backend_options={"remote_config": {"num_cpus": 0}})
    try:
        assert server.service_backend == "ray" and server.transport_kind == "ray"
        server.start()
        td = obs()
        ans = lib.PolicyClientModule(server)(td)
        assert torch.allclose(ans["action"], expected(seed_policy(), td), atol=1e-6)
        assert TORCHRL_STATS_KEYS <= set(server.stats())
    finally:
        server.shutdown()


def test_differences_table_is_well_formed():
    assert DIFFERENCES and all(len(d) == 3 and all(isinstance(x, str) and x for x in d) for d in DIFFERENCES)
