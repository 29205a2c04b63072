"""Weight sync across real spawned processes: atomic, versioned answers both ways round.

(a) trainer in this process, InferenceServer + actor threads in a spawned process
    (MultiProcessWeightSyncScheme pickled to it as a Process argument);
(b) trainer in a spawned process, server here (SharedMemWeightSyncScheme shared the other way).
"""
import multiprocessing as mp
import threading
import time

import torch
from tensordict import TensorDict

from rlserve import InferenceServer, MultiProcessWeightSyncScheme, SharedMemWeightSyncScheme, ThreadingTransport
from weight_probe import check_answer, fill_, probe_module

CTX = mp.get_context("spawn")


def _query_loop(client, stop, n_actors=4):
    results = [[] for _ in range(n_actors)]
    errors = []

    def actor(i):
        try:
            while not stop.is_set():
                results[i].append(check_answer(client(TensorDict(observation=torch.randn(64)), timeout=10)))
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(n_actors)]
    for t in threads:
        t.start()
    return threads, results, errors


def _summary(results, errors):
    answers = [a for r in results for a in r]
    return {
        "n": len(answers),
        "torn": [a for a in answers if not a[1]][:5],
        "versions": len({v for v, _ in answers}),
        "monotonic": all([v for v, _ in r] == sorted(v for v, _ in r) for r in results),
        "errors": errors,
    }


def serve_in_child(scheme, conn):
    """Spawned: own InferenceServer + actor threads; reports what the actors saw."""
    torch.set_num_threads(1)
    with InferenceServer(probe_module(), ThreadingTransport(), weight_sync=scheme, max_batch_size=4) as server:
        client = server.client()
        stop = threading.Event()
        threads, results, errors = _query_loop(client, stop)
        conn.send("ready")
        final = conn.recv()  # the last version the trainer sent
        stop.set()
        for t in threads:
            t.join(10)
        out = _summary(results, errors)
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            seen = check_answer(client(TensorDict(observation=torch.randn(64)), timeout=10))
            if seen[0] == final:
                break
        out["final"] = seen
        conn.send(out)


def train_in_child(scheme, conn):
    """Spawned: a trainer sending as fast as it can until told to stop."""
    torch.set_num_threads(1)
    model = probe_module()
    conn.send("ready")
    n = 0
    while not conn.poll():
        k = scheme.version + 1
        fill_(model, k)
        assert scheme.send(model=model) == k
        n += 1
    conn.recv()
    conn.send(n)


def _join(p):
    p.join(20)
    if p.is_alive():
        p.kill()
        p.join(5)


def test_trainer_here_server_in_spawned_process():
    scheme = MultiProcessWeightSyncScheme()
    trainer = probe_module()
    scheme.init_on_sender(model=trainer)
    here, there = CTX.Pipe()
    p = CTX.Process(target=serve_in_child, args=(scheme, there), daemon=True)
    p.start()
    try:
        assert here.poll(60), "server process did not start"
        assert here.recv() == "ready"
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:  # as fast as we can
            k = scheme.version + 1
            fill_(trainer, k)
            assert scheme.send(model=trainer) == k
        here.send(scheme.version)
        assert here.poll(60)
        out = here.recv()
    finally:
        _join(p)
    assert not out["errors"], out["errors"]
    assert out["n"] > 50 and not out["torn"], out
    assert out["versions"] > 3 and out["monotonic"], out
    assert out["final"] == (scheme.version, True), out  # the newest set reaches the server
    assert p.exitcode == 0


def test_trainer_in_spawned_process_server_here():
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=probe_module())  # allocates the shared staging here
    here, there = CTX.Pipe()
    p = CTX.Process(target=train_in_child, args=(scheme, there), daemon=True)
    with InferenceServer(probe_module(), ThreadingTransport(), weight_sync=scheme, max_batch_size=4) as server:
        p.start()
        try:
            assert here.poll(60) and here.recv() == "ready"
            stop = threading.Event()
            threads, results, errors = _query_loop(server.client(), stop)
            time.sleep(1.5)
            here.send("stop")
            assert here.poll(30)
            n_sent = here.recv()
            stop.set()
            for t in threads:
                t.join(10)
        finally:
            _join(p)
        # versions come from the shared counter: the child's sends are visible here
        assert scheme.version == n_sent > 10
        last = check_answer(server.client()(TensorDict(observation=torch.randn(64)), timeout=10))
    out = _summary(results, errors)
    assert not out["errors"], out["errors"]
    assert out["n"] > 50 and not out["torn"], out
    assert out["versions"] > 3 and out["monotonic"], out
    assert last == (n_sent, True)
    assert p.exitcode == 0
