"""Weight sync in one process: seed example, atomic + versioned answers, in-place copy,
buffers, validation, newest-wins, a server that never waits for the trainer, update_weights."""
import pickle
import threading
import time

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from rlserve import (
    InferenceServer,
    MultiProcessWeightSyncScheme,
    NoWeightSyncScheme,
    SharedMemWeightSyncScheme,
    ThreadingTransport,
)
from weight_probe import check_answer, fill_, probe_module


def obs(n=64):
    return TensorDict(observation=torch.randn(n))


def seed_policy():
    return TensorDictModule(
        nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)), in_keys=["observation"], out_keys=["action"]
    )


def test_seed_example_runs_as_written():
    """The seed's weight-sync example (import line changed, `...` dropped) trains and the server follows."""
    torch.manual_seed(0)
    training_model, inference_model = seed_policy(), seed_policy()
    optimizer = torch.optim.SGD(training_model.parameters(), lr=0.1)
    dataloader = [TensorDict(observation=torch.randn(16, 8), batch_size=[16]) for _ in range(5)]

    def loss_fn(td):
        return td["action"].pow(2).mean()

    weight_sync = SharedMemWeightSyncScheme()
    weight_sync.init_on_sender(model=training_model)
    server = InferenceServer(model=inference_model, transport=ThreadingTransport(), weight_sync=weight_sync)
    server.start()
    try:
        client = server.client()
        for batch in dataloader:
            optimizer.zero_grad()
            loss = loss_fn(training_model(batch))
            loss.backward()
            optimizer.step()
            weight_sync.send(model=training_model)  # pushed to server
        x = TensorDict(observation=torch.randn(8))
        out = client(x, timeout=10)
        assert int(out["policy_version"]) == 5 == weight_sync.version
        with torch.no_grad():
            expected = training_model(x.clone())["action"]
        torch.testing.assert_close(out["action"], expected)
    finally:
        server.shutdown()


def test_atomic_and_versioned_under_a_racing_trainer():
    """Trainer thread sends as fast as it can, 8 actors query as fast as they can: every answer
    was produced by exactly one weight set, and its policy_version names that set."""
    model, trainer_model = probe_module(), probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer_model)
    live_ptrs = [p.data_ptr() for p in model.parameters()]
    stop = threading.Event()
    sent = []
    results = [[] for _ in range(8)]
    errors = []

    def trainer():
        while not stop.is_set():
            k = scheme.version + 1
            fill_(trainer_model, k)
            assert scheme.send(model=trainer_model) == k
            sent.append(k)

    def actor(i, client):
        try:
            while not stop.is_set():
                results[i].append(check_answer(client(obs(), timeout=10)))
        except BaseException as e:
            errors.append(e)

    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme, max_batch_size=4) as server:
        threads = [threading.Thread(target=trainer)]
        threads += [threading.Thread(target=actor, args=(i, server.client())) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    answers = [a for r in results for a in r]
    assert len(answers) > 100 and len(sent) > 10
    torn = [a for a in answers if not a[1]]
    assert not torn, f"{len(torn)} of {len(answers)} answers mixed weight sets or misnamed them: {torn[:5]}"
    versions = {v for v, _ in answers}
    assert len(versions) > 3, "the server never picked up new weights while serving"
    for r in results:  # one actor's answers never go back in time
        vs = [v for v, _ in r]
        assert vs == sorted(vs)
    assert [p.data_ptr() for p in model.parameters()] == live_ptrs  # copied in place


def test_buffers_are_synced_in_place():
    torch.manual_seed(0)

    def make():
        return TensorDictModule(
            nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)), in_keys=["observation"], out_keys=["action"]
        )

    trainer, served = make(), make().eval()
    served.load_state_dict(trainer.state_dict())
    ptrs = {k: v.data_ptr() for k, v in served.state_dict().items()}
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    trainer.train()
    for _ in range(3):  # moves running_mean / running_var / num_batches_tracked
        trainer(TensorDict(observation=torch.randn(32, 8) + 3, batch_size=[32]))
    with InferenceServer(served, ThreadingTransport(), weight_sync=scheme) as server:
        v = scheme.send(model=trainer)
        out = server.client()(TensorDict(observation=torch.randn(8)), timeout=10)
        assert int(out["policy_version"]) == v == 1
    bn_t, bn_s = trainer.module[1], served.module[1]
    assert bn_s.running_mean.abs().sum() > 0
    torch.testing.assert_close(bn_s.running_mean, bn_t.running_mean)
    torch.testing.assert_close(bn_s.running_var, bn_t.running_var)
    assert int(bn_s.num_batches_tracked) == 3
    assert {k: v.data_ptr() for k, v in served.state_dict().items()} == ptrs


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda sd: sd.pop("module.l2.bias"), "missing keys ['module.l2.bias']"),
        (lambda sd: sd.__setitem__("module.extra", torch.zeros(1)), "unexpected keys ['module.extra']"),
        (lambda sd: sd.__setitem__("module.l1.weight", torch.zeros(3, 3)), "'module.l1.weight' has shape [3, 3]"),
        (lambda sd: sd.__setitem__("module.stat", torch.zeros(64, dtype=torch.float64)), "'module.stat' has dtype"),
    ],
)
def test_mismatched_weights_fail_on_the_trainer_and_old_weights_keep_serving(mutate, expect):
    model = probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=probe_module())
    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme) as server:
        good = probe_module()
        fill_(good, 1)
        assert scheme.send(model=good) == 1
        client = server.client()
        assert check_answer(client(obs(), timeout=10)) == (1, True)
        bad = {k: v.clone() for k, v in good.state_dict().items()}
        for v in bad.values():
            v.fill_(7)
        mutate(bad)
        with pytest.raises(ValueError, match="do not match") as ei:
            scheme.send(weights=bad)
        assert expect in str(ei.value)
        assert scheme.version == 1
        for _ in range(3):
            assert check_answer(client(obs(), timeout=10)) == (1, True)
        assert server.is_alive


def test_newest_wins_without_queueing():
    """50 sends while the server is idle: its next batch uses the 50th set, staging stays 3 slots."""
    model, trainer = probe_module(), probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme) as server:
        applied = []
        real_receive = scheme.receive

        def counting_receive():  # a spy on the real method: counts the sets actually copied in
            v = real_receive()
            if v is not None:
                applied.append(v)
            return v

        scheme.receive = counting_receive
        time.sleep(0.1)  # the idle loop may pick up nothing meanwhile: no sends yet
        for k in range(1, 51):
            fill_(trainer, k)
            scheme.send(model=trainer)
        assert check_answer(server.client()(obs(), timeout=10)) == (50, True)
    # the newest set, not fifty queued ones (an idle server polls every 50 ms and may catch a few early ones)
    assert applied[-1] == 50 and len(applied) <= 10


def test_server_never_waits_for_the_trainer():
    """While the trainer holds the staging bookkeeping lock, the server keeps answering with the
    weights it has; it picks the new set up at a batch after the lock is free."""
    model, trainer = probe_module(), probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme) as server:
        client = server.client()
        fill_(trainer, 1)
        scheme.send(model=trainer)
        assert check_answer(client(obs(), timeout=10)) == (1, True)
        fill_(trainer, 2)
        scheme.send(model=trainer)
        assert scheme._buf._lock.acquire(timeout=5)  # a trainer stuck mid-publish
        try:
            for _ in range(3):
                assert check_answer(client(obs(), timeout=5)) == (1, True)
        finally:
            scheme._buf._lock.release()
        assert check_answer(client(obs(), timeout=10)) == (2, True)


def test_weights_sent_before_start_and_receiver_first():
    model, trainer = probe_module(), probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    fill_(trainer, 4)
    scheme.send(model=trainer, version=4)
    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme) as server:
        assert check_answer(server.client()(obs(), timeout=10)) == (4, True)
    # server first: the scheme takes its layout from the served model
    scheme2 = SharedMemWeightSyncScheme()
    with InferenceServer(probe_module(), ThreadingTransport(), weight_sync=scheme2) as server:
        fill_(trainer, 1)
        assert scheme2.send(weights=trainer.state_dict()) == 1
        assert check_answer(server.client()(obs(), timeout=10)) == (1, True)


def test_served_model_must_match_the_scheme_and_one_server_per_scheme():
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=probe_module())
    with pytest.raises(ValueError, match="served model does not match"):
        InferenceServer(probe_module(width=32), ThreadingTransport(), weight_sync=scheme).start()
    with InferenceServer(probe_module(), ThreadingTransport(), weight_sync=scheme):
        with pytest.raises(RuntimeError, match="already feeds a server"):
            InferenceServer(probe_module(), ThreadingTransport(), weight_sync=scheme).start()
    # after shutdown the scheme can feed a new server
    with InferenceServer(probe_module(), ThreadingTransport(), weight_sync=scheme) as server:
        assert server.is_alive


def test_scheme_refuses_plain_pickle():
    scheme = MultiProcessWeightSyncScheme()
    with pytest.raises(RuntimeError, match="init_on_sender"):
        pickle.dumps(scheme)
    scheme.init_on_sender(model=probe_module())
    with pytest.raises(RuntimeError, match="multiprocessing.Process"):
        pickle.dumps(scheme)


def test_no_weight_sync_scheme():
    scheme = NoWeightSyncScheme()
    scheme.init_on_sender(model=probe_module())
    model = probe_module()
    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme) as server:
        assert scheme.send(model=probe_module()) == 0
        assert check_answer(server.client()(obs(), timeout=10)) == (0, True)


def test_update_weights_state_dict_and_tensordict():
    model = probe_module()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with InferenceServer(model, ThreadingTransport()) as server:
        client = server.client()
        src = probe_module()
        fill_(src, 1)
        assert server.update_weights(src.state_dict()) == 1
        assert check_answer(client(obs(), timeout=10)) == (1, True)
        params = TensorDict.from_module(src).detach().clone()
        params.apply_(lambda t: t.fill_(5))
        assert server.update_weights(params, version=5) == 5
        assert check_answer(client(obs(), timeout=10)) == (5, True)
        # snapshot taken at the call: changing the source afterwards cannot tear the pending set
        sd = {k: v.clone().fill_(6) for k, v in src.state_dict().items()}
        server.update_weights(sd)
        for v in sd.values():
            v.fill_(-1)
        assert check_answer(client(obs(), timeout=10)) == (6, True)
        bad = dict(sd)
        bad["module.l1.weight"] = torch.zeros(2)
        with pytest.raises(ValueError, match="'module.l1.weight' has shape"):
            server.update_weights(bad)
        assert check_answer(client(obs(), timeout=10)) == (6, True)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_update_weights_before_start_applies_at_once():
    model = probe_module()
    server = InferenceServer(model, ThreadingTransport())
    src = probe_module()
    fill_(src, 3)
    assert server.update_weights(src) == 1
    assert float(model.module.l1.weight.detach()[0, 0]) == 3.0 and server.policy_version == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_cross_devices_cuda():
    """Trainer on CPU, served model on CUDA, staging in CPU shared memory or on the GPU."""
    for staging in (None, "cuda"):
        model = probe_module().cuda()
        trainer = probe_module()
        scheme = SharedMemWeightSyncScheme(device=staging)
        scheme.init_on_sender(model=trainer)
        with InferenceServer(model, ThreadingTransport(), weight_sync=scheme, device="cuda") as server:
            fill_(trainer, 2)
            assert scheme.send(model=trainer) == 1
            out = server.client()(obs(), timeout=30)
            assert check_answer(out) == (1, True) and out["probe"].device.type == "cpu"


def test_update_weights_is_refused_next_to_a_scheme():
    """Two version sources on one server could run versions backwards: one source only."""
    model, trainer = probe_module(), probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    server = InferenceServer(model, ThreadingTransport(), weight_sync=scheme)
    fill_(trainer, 1)
    assert scheme.send(model=trainer) == 1
    fill_(trainer, 7)
    with pytest.raises(RuntimeError, match="scheme.send"):
        server.update_weights(trainer.state_dict(), version=7)
    with server:
        assert check_answer(server.client()(obs(), timeout=10)) == (1, True)  # the scheme's set, untouched


def test_an_idle_server_takes_new_weights_without_a_request():
    model, trainer = probe_module(), probe_module()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    with InferenceServer(model, ThreadingTransport(), weight_sync=scheme) as server:
        fill_(trainer, 1)
        scheme.send(model=trainer)
        deadline = time.monotonic() + 5
        while server.stats()["policy_version"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["policy_version"] == 1  # applied while idle, not at the next request
        assert check_answer(server.client()(obs(), timeout=10)) == (1, True)
