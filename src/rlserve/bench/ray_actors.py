"""Ray actors looping on the seed policy: rlserve's RayTransport next to Ray's own floor.

Rows (each for 1, 4 and 8 Ray actors, ``ray.init(num_cpus=2)``):

* ``rlserve/actor``  -- RayTransport with the server in a Ray actor (policy factory);
* ``rlserve/driver`` -- RayTransport with the InferenceServer in the driver (gateway actor);
* ``echo/wire``      -- the engine's floor: one call to an async Ray actor that returns
  its argument, sent by the same client code (same wire format) but without any server;
* ``echo/td``        -- the same echo call carrying the TensorDict itself;
* ``torchrl``        -- torchrl 0.14's RayTransport, run in ``--torchrl-python`` (a
  second venv with torchrl) when given, right after each rlserve repeat; one
  client per actor (its clients each own a reply queue). A torchrl call left
  unanswered for 10 s counts as a *stall* and the actor goes on.

Per-request cost = 1 / req/s of the whole run. Actors start together at a fixed wall
time after a warm-up call; only requests finished inside the window count.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from .common import batch_meter, pct, print_table, seed_policy, summarize, wait_idle  # noqa: E402

MAX_BATCH = 32
TORCHRL_CALL_TIMEOUT = 10.0  # s; a torchrl call unanswered this long counts as a stall


class Looper:
    """Body of a benchmark actor: loops ``client(td)`` inside a shared time window."""

    def __init__(self, client):
        torch.set_num_threads(1)
        self.client = client

    def warm(self, call_timeout=None) -> bool:
        for _ in range(3):
            self.client(TensorDict(observation=torch.randn(8)), timeout=call_timeout)
        return True

    def run(self, start_at: float, seconds: float, call_timeout=None):
        """Latencies of the calls finished in the window, and how many calls stalled.

        With ``call_timeout`` a call that gets no answer in time counts as a
        stall and the loop goes on (torchrl's Ray client can lose a reply
        under load and would otherwise block this actor for good).
        """
        client = self.client
        perf = time.perf_counter
        while time.time() < start_at:
            time.sleep(0.001)
        end = perf() + seconds
        lats = []
        stalls = 0
        while True:
            td = TensorDict(observation=torch.randn(8))
            t0 = perf()
            try:
                client(td, timeout=call_timeout)
            except (TimeoutError, queue.Empty):  # torchrl's client raises queue.Empty
                stalls += 1
            else:
                t1 = perf()
                if t1 <= end:
                    lats.append(t1 - t0)
            if perf() > end:
                break
        return lats, stalls


class EchoActor:
    """The engine floor: an async actor that returns what it is given (the encoded request)."""

    async def infer(self, payload):
        return payload

    async def echo(self, td):
        return td


class EchoTDClient:
    """Calls ``EchoActor.echo`` with the TensorDict itself (no rlserve wire format)."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, td, timeout=None):
        import ray

        return ray.get(self.handle.echo.remote(td), timeout=timeout)


def init_ray() -> None:
    import ray

    ray.init(
        address="local",  # a new instance of our own, never another session's cluster
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )


def run_actors(client, n: int, seconds: float, call_timeout=None, per_actor: bool = False) -> dict:
    """``n`` Ray actors loop ``client(td)`` for ``seconds``; returns req/s, latency and stalls.

    ``client``: one client shared by all actors, or with ``per_actor`` a
    zero-argument factory called once per actor.
    """
    import ray

    cls = ray.remote(num_cpus=0)(Looper)
    actors = [cls.remote(client() if per_actor else client) for _ in range(n)]
    slack = 120 + (call_timeout or 0) * 3
    try:
        # warm-up waits long: the first calls wait for fresh worker processes (torchrl: reply-queue actors)
        ray.get([a.warm.remote(call_timeout and 120.0) for a in actors], timeout=slack + 360)
        start_at = time.time() + 0.3
        parts = ray.get([a.run.remote(start_at, seconds, call_timeout) for a in actors], timeout=seconds + slack)
    finally:
        for a in actors:
            ray.kill(a)
    lats = [x for p, _ in parts for x in p]
    return {"req_s": len(lats) / seconds, "p50_us": pct(lats, 0.5) * 1e6, "p99_us": pct(lats, 0.99) * 1e6,
            "stalls": sum(s for _, s in parts)}


def bench_actor_hosted(n: int, seconds: float) -> dict:
    from rlserve import RayTransport

    tr = RayTransport(policy_factory=seed_policy, server_kwargs={"max_batch_size": MAX_BATCH})
    try:
        tr.client()(TensorDict(observation=torch.randn(8)))
        meter = batch_meter(tr.stats)
        r = run_actors(tr.client(), n, seconds)
        r["batch"] = meter()
    finally:
        tr.shutdown()
    return r


def bench_driver_hosted(n: int, seconds: float) -> dict:
    from rlserve import InferenceServer, RayTransport

    tr = RayTransport()
    try:
        with InferenceServer(seed_policy(), tr, max_batch_size=MAX_BATCH) as server:
            meter = batch_meter(server.stats)
            r = run_actors(tr.client(), n, seconds)
            r["batch"] = meter()
    finally:
        tr.shutdown()
    return r


def bench_echo(n: int, seconds: float, wire: bool) -> dict:
    import ray

    from rlserve.transports.ray import RayClient

    echo = ray.remote(num_cpus=0, max_concurrency=10_000)(EchoActor).remote()
    try:
        client = RayClient(echo) if wire else EchoTDClient(echo)
        r = run_actors(client, n, seconds)
    finally:
        ray.kill(echo)
    r["batch"] = 1.0
    return r


def bench_torchrl(n: int, seconds: float) -> dict:
    """torchrl 0.14's RayTransport with the same actors (run inside the torchrl venv)."""
    from torchrl.modules.inference_server import InferenceServer, RayTransport

    tr = RayTransport()
    with InferenceServer(seed_policy(), tr, max_batch_size=MAX_BATCH) as server:
        server.stats(reset=True)
        # one client per actor: torchrl's clients each own a reply queue
        r = run_actors(tr.client, n, seconds, call_timeout=TORCHRL_CALL_TIMEOUT, per_actor=True)
        r["batch"] = server.stats().get("avg_batch_size", float("nan"))
    return r


def _torchrl_subprocess(python: str, counts, seconds: float) -> list[tuple[int, dict]]:
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [python, "-m", "rlserve.bench.ray_actors", "--torchrl-only", "--seconds", str(seconds),
           "--actors", *map(str, counts)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = [json.loads(line[5:]) for line in p.stdout.splitlines() if line.startswith("JSON ")]
    if p.returncode != 0 or not out:
        print(f"# torchrl run failed (rc={p.returncode}): {p.stderr.strip()[-500:]}", file=sys.stderr)
    return [(o["actors"], o) for o in out]


VARIANTS = {
    "rlserve/actor": lambda n, s: bench_actor_hosted(n, s),
    "rlserve/driver": lambda n, s: bench_driver_hosted(n, s),
    "echo/wire": lambda n, s: bench_echo(n, s, wire=True),
    "echo/td": lambda n, s: bench_echo(n, s, wire=False),
}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--torchrl-python", default=None,
                    help="python of a venv with torchrl 0.14 (e.g. .venv-bench/bin/python) for the reference row")
    ap.add_argument("--torchrl-actors", type=int, nargs="+", default=[4])
    ap.add_argument("--torchrl-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-wait-idle", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import ray

    if a.torchrl_only:  # child mode: print one JSON line per actor count
        init_ray()
        try:
            for n in a.actors:
                print("JSON " + json.dumps({"actors": n, **bench_torchrl(n, a.seconds)}), flush=True)
        finally:
            ray.shutdown()
        return []

    print(f"# Ray benchmark: ray {ray.__version__}, torch {torch.__version__}, seed policy, "
          f"max_batch_size={MAX_BATCH}, {a.seconds}s x {a.repeats} repeats, median [min-max]")
    results: dict = {}
    for rep in range(a.repeats):
        if not a.no_wait_idle:
            wait_idle()
        init_ray()
        try:
            for n in a.actors:
                k = rep % len(a.variants)  # rotate the order: no row always runs first or last
                for name in a.variants[k:] + a.variants[:k]:
                    if not a.no_wait_idle:
                        wait_idle()  # the previous row's killed workers may still be winding down
                    results.setdefault((name, n), []).append(VARIANTS[name](n, a.seconds))
        finally:
            ray.shutdown()
        if a.torchrl_python:
            for n, r in _torchrl_subprocess(a.torchrl_python, a.torchrl_actors, a.seconds):
                results.setdefault(("torchrl", n), []).append(r)
    return report(results, a.actors)


def report(results: dict, counts) -> list[dict]:
    rows = []
    for (name, n), rs in results.items():
        rows.append({
            "transport": name,
            "actors": n,
            "req/s": summarize([r["req_s"] for r in rs]),
            "us/req": f"{1e6 / statistics.median(r['req_s'] for r in rs):.0f}",
            "p50 us": f"{statistics.median(r['p50_us'] for r in rs):.0f}",
            "p99 us": f"{statistics.median(r['p99_us'] for r in rs):.0f}",
            "batch": f"{statistics.median(r['batch'] for r in rs):.1f}",
            "stalls": sum(r.get("stalls", 0) for r in rs),
            "_req_s": statistics.median(r["req_s"] for r in rs),
        })
    rows.sort(key=lambda r: (r["actors"], r["transport"]))
    print_table(rows, ["transport", "actors", "req/s", "us/req", "p50 us", "p99 us", "batch", "stalls"])
    med = {(r["transport"], r["actors"]): r["_req_s"] for r in rows}
    for n in counts:
        floor = med.get(("echo/wire", n))
        for name in ("rlserve/actor", "rlserve/driver"):
            if (name, n) in med and floor:
                print(f"{name} at {n} actors: per-request cost {floor / med[(name, n)]:.2f}x echo/wire"
                      + (f", {med[(name, n)] / med[('torchrl', n)]:.1f}x torchrl" if ("torchrl", n) in med else ""))
    return rows


if __name__ == "__main__":
    main()
