"""The in-process path: seed example, routing, grouping, aliasing, version stamps."""
import concurrent.futures
import threading

import torch
from tensordict import TensorDict

from rlserve import InferenceServer, ThreadingTransport


def test_seed_example_matches_direct_policy(policy):
    transport = ThreadingTransport()
    server = InferenceServer(policy, transport, max_batch_size=32)
    server.start()
    client = transport.client()
    obs = [TensorDict(observation=torch.randn(8)) for _ in range(400)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(client, obs))
    server.shutdown()
    for o, td in zip(outs, obs):
        direct = policy(td.clone())
        assert set(o.keys()) == set(direct.keys()) | {"policy_version"}
        assert o.batch_size == direct.batch_size
        # batched kernels round differently from per-row ones (1e-7): same values up to that
        torch.testing.assert_close(o["action"], direct["action"])
        torch.testing.assert_close(o["observation"], td["observation"])
    assert server.stats()["mean_batch_size"] > 1.0  # it did batch


def test_each_answer_goes_back_to_its_caller(doubler):
    transport = ThreadingTransport()
    with InferenceServer(doubler, transport, max_batch_size=16):
        client = transport.client()
        bad = []

        def actor(i):
            for j in range(200):
                x = torch.full((3,), float(i * 1000 + j))
                out = client(TensorDict(observation=x))
                if not torch.equal(out["action"], 2 * x):
                    bad.append((i, j))

        ts = [threading.Thread(target=actor, args=(i,)) for i in range(12)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
    assert not bad


def test_answers_do_not_alias_the_request(policy):
    transport = ThreadingTransport()
    with InferenceServer(policy, transport, max_batch_size=8):
        td = TensorDict(observation=torch.randn(8))
        before = td["observation"].clone()
        out = transport.client()(td)
    assert "action" not in td.keys() and "policy_version" not in td.keys()
    out["observation"].add_(1.0)
    assert torch.equal(td["observation"], before)
    assert out["observation"].data_ptr() != td["observation"].data_ptr()


def test_policy_version_stamp_and_key(policy):
    t1 = ThreadingTransport()
    with InferenceServer(policy, t1, max_batch_size=4):
        out = t1.client()(TensorDict(observation=torch.randn(8)))
    assert out["policy_version"].dtype == torch.int64 and out["policy_version"].item() == 0
    t2 = ThreadingTransport()
    with InferenceServer(policy, t2, policy_version_key="ver"):
        out = t2.client()(TensorDict(observation=torch.randn(8)))
    assert "ver" in out.keys() and "policy_version" not in out.keys()
    t3 = ThreadingTransport()
    with InferenceServer(policy, t3, policy_version_key=None):
        out = t3.client()(TensorDict(observation=torch.randn(8)))
    assert set(out.keys()) == {"observation", "action"}


def _submit_together(transport, tds):
    """Queue all requests before the server can drain them (it waits for min_batch_size)."""
    client = transport.client()
    return [client.submit(td) for td in tds]


def test_different_layouts_are_batched_separately(doubler):
    calls = []

    def model(batch):
        calls.append((tuple(sorted(batch.keys())), tuple(batch["observation"].shape), batch["observation"].dtype))
        return doubler(batch)

    transport = ThreadingTransport()
    tds = [
        TensorDict(observation=torch.ones(3)),
        TensorDict(observation=torch.ones(5)),
        TensorDict(observation=torch.ones(3, dtype=torch.float64)),
        TensorDict(observation=torch.ones(3), extra=torch.zeros(1)),
        TensorDict(observation=torch.full((3,), 2.0)),
    ]
    with InferenceServer(model, transport, max_batch_size=8, min_batch_size=5, timeout=5.0):
        futs = _submit_together(transport, tds)
        outs = [f.result(timeout=10) for f in futs]
    for td, out in zip(tds, outs):
        assert torch.equal(out["action"], td["observation"] * 2)
        assert out["action"].dtype == td["observation"].dtype
    assert sorted(c[1][0] for c in calls) == [1, 1, 1, 2]  # four groups, the two alike together
    assert len(calls) == 4


def test_nested_and_non_tensor_requests_take_the_general_path():
    def model(batch):
        batch["action"] = batch["obs", "pos"] + batch["obs", "vel"]
        return batch

    transport = ThreadingTransport()
    with InferenceServer(model, transport, max_batch_size=8):
        client = transport.client()
        td = TensorDict({"obs": {"pos": torch.ones(2), "vel": torch.full((2,), 3.0)}})
        td.set_non_tensor("tag", "env-7")
        out = client(td)
    assert torch.equal(out["action"], torch.full((2,), 4.0))
    assert out["tag"] == "env-7"
    assert out["policy_version"].item() == 0


def test_uint8_images_and_batched_requests(doubler):
    transport = ThreadingTransport()
    with InferenceServer(doubler, transport, max_batch_size=8):
        client = transport.client()
        img = torch.randint(0, 100, (3, 84, 84), dtype=torch.uint8)
        out = client(TensorDict(observation=img))
        assert torch.equal(out["action"], img * 2)
        # a request that is itself a batch keeps its batch dims
        td = TensorDict(observation=torch.ones(5, 2), batch_size=[5])
        out = client(td)
        assert out.batch_size == torch.Size([5]) and out["policy_version"].shape == (5,)


def test_custom_collate_fn_cannot_alias_requests(doubler):
    from tensordict import lazy_stack

    transport = ThreadingTransport()
    td = TensorDict(observation=torch.ones(3))
    with InferenceServer(doubler, transport, collate_fn=lazy_stack):
        out = transport.client()(td)
    assert torch.equal(out["action"], torch.full((3,), 2.0))
    assert "action" not in td.keys()


def test_device_and_output_device(policy):
    transport = ThreadingTransport()
    with InferenceServer(policy, transport, device="cpu", output_device="cpu"):
        out = transport.client()(TensorDict(observation=torch.randn(8)))
    assert out["action"].device.type == "cpu"


def test_server_lets_answered_threads_resubmit_before_the_next_forward(policy, monkeypatch):
    """After answering N actor threads the server waits (bounded) for their next requests."""
    import time

    import rlserve.transports.threading as T

    monkeypatch.setattr(T, "_RETURN_SLICE_S", 0.1)
    monkeypatch.setattr(T, "_RETURN_PER_CALLER_S", 0.5)  # cap: 1.5 s for 3 callers
    transport = ThreadingTransport()  # no server: the transport's step is called directly

    def feed(k):
        for _ in range(k):
            time.sleep(0.02)
            transport.submit(TensorDict(observation=torch.randn(8)))

    def step(k_back):
        t = threading.Thread(target=feed, args=(k_back,))
        t0 = time.monotonic()
        t.start()
        transport.on_batch_done(3)
        waited, queued = time.monotonic() - t0, transport.pending()
        t.join(5)
        transport.drain(10)
        return waited, queued

    waited, queued = step(3)  # all three come back: it waits for them, no longer
    assert queued == 3 and waited < 1.0
    waited, queued = step(1)  # one of three: it stops after a slice with no newcomer, not at the cap
    assert queued == 1 and 0.15 < waited < 1.0


def test_server_does_not_wait_for_requests_max_pending_cannot_admit(policy, monkeypatch):
    """With max_pending reached no answered thread can resubmit: no wait, the next forward runs at once."""
    import time

    import rlserve.transports.threading as T

    monkeypatch.setattr(T, "_RETURN_SLICE_S", 0.5)
    monkeypatch.setattr(T, "_RETURN_PER_CALLER_S", 0.5)
    transport = ThreadingTransport(max_pending=2)  # no server: the transport's step is called directly
    for _ in range(2):  # queued while the last batch ran (answering it freed their room)
        transport.submit(TensorDict(observation=torch.randn(8)))
    t0 = time.monotonic()
    transport.on_batch_done(2)
    waited = time.monotonic() - t0
    transport.drain(10)
    assert waited < 0.25, f"slept {waited:.2f} s for requests max_pending=2 could never admit"


def test_callers_back_before_the_batch_was_fully_answered_count_as_back(policy, monkeypatch):
    """Requests resubmitted while the batch was being answered (here by done-callbacks) are not waited for twice."""
    import time

    import rlserve.transports.threading as T

    monkeypatch.setattr(T, "_RETURN_SLICE_S", 0.1)
    monkeypatch.setattr(T, "_RETURN_PER_CALLER_S", 0.5)
    transport = ThreadingTransport()
    chains, rounds = 4, 10
    left = [chains * rounds]
    done = threading.Event()
    with InferenceServer(policy, transport, max_batch_size=8) as server:
        client = transport.client()

        def again(fut):  # runs on the server thread while it answers: resubmits at once
            fut.result()
            left[0] -= 1
            if left[0] == 0:
                done.set()
            elif left[0] >= chains:
                client.submit(TensorDict(observation=torch.randn(8))).add_done_callback(again)

        t0 = time.monotonic()
        futs = [client.submit(TensorDict(observation=torch.randn(8))) for _ in range(chains)]
        for f in futs:
            f.add_done_callback(again)
        assert done.wait(30)
        took = time.monotonic() - t0
        assert server.stats()["mean_batch_size"] > 1  # batches of several answered callers: the wait applies
    # before the fix every batch idled one 0.1 s slice waiting for callers already back
    assert took < 0.5, f"{rounds} rounds took {took:.2f} s"
