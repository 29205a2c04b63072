"""Actor threads against ThreadingTransport, next to direct calls, the wake-up floor and the batched limit.

Also runs torchrl's ThreadingTransport server when torchrl is importable.
``switches/req``: voluntary context switches of the whole process per request
(a thread blocking on a lock or on the GIL), the main cost of a hand-over on a VM.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future

import torch
from tensordict import TensorDict

from .common import print_table, run_actor_threads, seed_policy, summarize, wait_idle


_make_obs = None  # None: each step builds a fresh observation (the actor's own tensor work)


def _actors(call, n: int, seconds: float) -> dict:
    return run_actor_threads(call, n, seconds, make_obs=_make_obs)


def _prebuilt_obs():
    """Observations built before the run, handed out in turn: measures serving alone."""
    pool = itertools.cycle([TensorDict(observation=torch.randn(8)) for _ in range(1024)])
    return lambda: next(pool)  # next() on a cycle is atomic under the GIL


def bench_rlserve(n: int, seconds: float, max_batch: int) -> dict:
    from rlserve import InferenceServer, ThreadingTransport

    policy = seed_policy()
    transport = ThreadingTransport()
    with InferenceServer(policy, transport, max_batch_size=max_batch) as server:
        client = transport.client()
        r = _actors(client, n, seconds)
        s = server.stats()
    r["batch"] = s["mean_batch_size"]
    return r


def bench_torchrl(n: int, seconds: float, max_batch: int) -> dict | None:
    try:
        from torchrl.modules.inference_server import InferenceServer, ThreadingTransport
    except ImportError:
        return None
    policy = seed_policy()
    transport = ThreadingTransport()
    server = InferenceServer(policy, transport, max_batch_size=max_batch)
    server.start()
    try:
        client = transport.client()
        r = _actors(client, n, seconds)
    finally:
        server.shutdown()
    r["batch"] = float("nan")
    return r


def bench_direct(n: int, seconds: float) -> dict:
    """Each actor thread calls the policy itself (no server)."""
    policy = seed_policy()
    lock_free = policy

    def call(td):
        with torch.no_grad():
            return lock_free(td)

    r = _actors(call, n, seconds)
    r["batch"] = 1.0
    return r


def bench_wake_floor(n: int, seconds: float) -> dict:
    """The hand-over floor: a server thread answering Futures with no tensor work at all.

    What the issue calls "waking a waiting thread through a Future": every
    threaded server pays this per request, whatever it computes.
    """
    q: deque = deque()
    cond = threading.Condition()
    stop = False

    def serve():
        while not stop:
            with cond:
                while not q and not stop:
                    cond.wait(0.05)
            while q:
                td, fut = q.popleft()
                fut.set_result(td)

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def call(td):
        fut = Future()
        q.append((td, fut))
        with cond:
            cond.notify()
        return fut.result()

    try:
        r = _actors(call, n, seconds)
    finally:
        stop = True
        t.join(5)
    r["batch"] = float("nan")
    return r


def bench_lock_floor(n: int, seconds: float) -> dict:
    """The least a hand-over costs: a server thread releasing each caller's own bare lock.

    No Future, no Condition, no tensor work on the server side; the actors'
    loop (and its observations) is the same as in every other row.
    """
    from _thread import allocate_lock

    q: deque = deque()
    wake = allocate_lock()
    wake.acquire()
    state = {"stop": False, "sleeping": False}
    local = threading.local()

    def serve():
        while not state["stop"]:
            if not q:
                state["sleeping"] = True
                if not q:
                    wake.acquire(timeout=0.05)
                state["sleeping"] = False
                continue
            while q:
                q.popleft().release()

    def call(td):
        lock = getattr(local, "lock", None)
        if lock is None:
            lock = local.lock = allocate_lock()
            lock.acquire()
        q.append(lock)
        if state["sleeping"]:
            state["sleeping"] = False
            try:
                wake.release()
            except RuntimeError:  # already released by another caller
                pass
        lock.acquire()
        return td

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = _actors(call, n, seconds)
    finally:
        state["stop"] = True
        t.join(5)
    r["batch"] = float("nan")
    return r


def bench_batched_limit(seconds: float, max_batch: int) -> dict:
    """One thread running the policy on pre-stacked batches: rows/s ceiling."""
    policy = seed_policy()
    batch = TensorDict(observation=torch.randn(max_batch, 8), batch_size=[max_batch])
    rows = 0
    with torch.no_grad():
        for _ in range(50):
            policy(batch.copy())
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            policy(batch.copy())
            rows += max_batch
    el = time.perf_counter() - t0
    return {"req_s": rows / el, "p50_us": el / (rows / max_batch) * 1e6, "p99_us": float("nan"), "batch": max_batch}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--no-wait-idle", action="store_true")
    ap.add_argument("--prebuilt-obs", action="store_true",
                    help="actors send observations built before the run instead of building one per step")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import tensordict

    global _make_obs
    _make_obs = _prebuilt_obs() if a.prebuilt_obs else None

    print(f"# threads benchmark: torch {torch.__version__}, tensordict {tensordict.__version__}, "
          f"max_batch_size={a.max_batch}, {a.seconds}s x {a.repeats} repeats, median [min-max]"
          + (", pre-built observations" if a.prebuilt_obs else ", a fresh observation per step"))
    results: dict = {}
    for rep in range(a.repeats):
        if not a.no_wait_idle:
            wait_idle()
        for n in a.actors:
            for name, fn in (
                ("rlserve", lambda: bench_rlserve(n, a.seconds, a.max_batch)),
                ("torchrl", lambda: bench_torchrl(n, a.seconds, a.max_batch)),
                ("direct", lambda: bench_direct(n, a.seconds)),
                ("wake-floor", lambda: bench_wake_floor(n, a.seconds)),
                ("lock-floor", lambda: bench_lock_floor(n, a.seconds)),
            ):
                r = fn()
                if r is not None:
                    results.setdefault((name, n), []).append(r)
        results.setdefault(("batched-limit", a.max_batch), []).append(bench_batched_limit(a.seconds, a.max_batch))
    rows = []
    for (name, n), rs in results.items():
        rows.append({
            "transport": name,
            "actors": n,
            "req/s": summarize([r["req_s"] for r in rs]),
            "p50 us": f"{statistics.median(r['p50_us'] for r in rs):.0f}",
            "p99 us": f"{statistics.median(r['p99_us'] for r in rs):.0f}",
            "batch": f"{statistics.median(r['batch'] for r in rs):.1f}",
            "switches/req": f"{statistics.median(r.get('switches', float('nan')) for r in rs):.1f}",
            "_req_s": statistics.median(r["req_s"] for r in rs),
        })
    rows.sort(key=lambda r: (r["transport"] != "rlserve", r["transport"], r["actors"]))
    print_table(rows, ["transport", "actors", "req/s", "p50 us", "p99 us", "batch", "switches/req"])
    med = {(r["transport"], r["actors"]): r["_req_s"] for r in rows}
    for n in a.actors:
        if ("torchrl", n) in med:
            print(f"rlserve / torchrl at {n} actors: {med[('rlserve', n)] / med[('torchrl', n)]:.2f}x")
        print(f"rlserve / wake-floor at {n} actors: {med[('rlserve', n)] / med[('wake-floor', n)]:.2f}x")
    return rows


if __name__ == "__main__":
    main()
