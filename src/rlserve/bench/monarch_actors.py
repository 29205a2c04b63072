"""Monarch actors looping on the seed policy: MonarchTransport next to Monarch's bare echo endpoint.

Rows (each for 1, 4 and 8 actor processes in one process mesh):

* ``rlserve/actor``  -- server in its own Monarch process (policy factory);
* ``rlserve/driver`` -- InferenceServer in the driver; endpoint actor spawned in the driver;
* ``echo/wire``      -- the engine floor: a plain ``@endpoint`` that returns its
  argument, called by the same client code (same wire format), no server.

Per-request cost = 1 / req/s of the whole run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HYPERACTOR_MESH_SUPERVISION_POLL_FREQUENCY", "1s")

import torch  # noqa: E402
from monarch.actor import Actor, endpoint, this_host  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from .common import batch_meter, pct, print_table, seed_policy, summarize, wait_idle  # noqa: E402

MAX_BATCH = 32


class Looper(Actor):
    def __init__(self, client):
        torch.set_num_threads(1)
        self.client = client

    @endpoint
    def run(self, start_at: float, seconds: float):
        for _ in range(3):
            self.client(TensorDict(observation=torch.randn(8)))
        while time.time() < start_at:
            time.sleep(0.001)
        perf = time.perf_counter
        end = perf() + seconds
        lats = []
        while True:
            td = TensorDict(observation=torch.randn(8))
            t0 = perf()
            self.client(td)
            t1 = perf()
            if t1 > end:
                return lats
            lats.append(t1 - t0)


class Echo(Actor):
    """The engine floor: a plain endpoint returning the encoded request (Monarch's cheapest call)."""

    @endpoint
    def infer(self, payload):
        return payload


def run_mesh(procs, n: int, client, seconds: float, tag: str) -> dict:
    mesh = procs.slice(procs=slice(0, n)).spawn(f"loop_{tag}_{n}_{time.monotonic_ns()}", Looper, client)
    start_at = time.time() + 1.0
    try:
        parts = list(mesh.run.call(start_at, seconds).get(timeout=seconds + 120).values())
    finally:
        mesh.stop().get(timeout=60)  # idle loopers left behind would tax the next rows
    lats = [x for p in parts for x in p]
    return {"req_s": len(lats) / seconds, "p50_us": pct(lats, 0.5) * 1e6, "p99_us": pct(lats, 0.99) * 1e6}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-wait-idle", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rlserve import InferenceServer, MonarchTransport
    from rlserve.transports.monarch import MonarchClient

    print(f"# Monarch benchmark: torch {torch.__version__}, seed policy, max_batch_size={MAX_BATCH}, "
          f"{a.seconds}s x {a.repeats} repeats, median [min-max]")
    procs = this_host().spawn_procs(per_host={"procs": max(a.actors)})
    results: dict = {}
    try:
        def hosted(n):
            with MonarchTransport(seed_policy, server_kwargs={"max_batch_size": MAX_BATCH}) as tr:
                m = batch_meter(tr.stats)
                r = run_mesh(procs, n, tr.client(), a.seconds, "a")
                r["batch"] = m()
            return r

        def in_driver(n):
            tr = MonarchTransport()
            with InferenceServer(seed_policy(), tr, max_batch_size=MAX_BATCH) as server:
                m = batch_meter(server.stats)
                r = run_mesh(procs, n, tr.client(), a.seconds, "d")
                r["batch"] = m()
            tr.shutdown()
            return r

        def echo(n):
            eprocs = this_host().spawn_procs()
            try:
                r = run_mesh(procs, n, MonarchClient(eprocs.spawn("echo", Echo)), a.seconds, "e")
            finally:
                eprocs.stop().get()
            r["batch"] = 1.0
            return r

        rows = [("rlserve/actor", hosted), ("rlserve/driver", in_driver), ("echo/wire", echo)]
        for rep in range(a.repeats):
            if not a.no_wait_idle:
                wait_idle()
            for n in a.actors:
                k = rep % len(rows)  # rotate the order: no row always runs first or last
                for name, run in rows[k:] + rows[:k]:
                    results.setdefault((name, n), []).append(run(n))
    finally:
        procs.stop().get()
    rows = []
    for (name, n), rs in results.items():
        rows.append({"transport": name, "actors": n, "req/s": summarize([r["req_s"] for r in rs]),
                     "us/req": f"{1e6 / statistics.median(r['req_s'] for r in rs):.0f}",
                     "p50 us": f"{statistics.median(r['p50_us'] for r in rs):.0f}",
                     "p99 us": f"{statistics.median(r['p99_us'] for r in rs):.0f}",
                     "batch": f"{statistics.median(r['batch'] for r in rs):.1f}",
                     "_req_s": statistics.median(r["req_s"] for r in rs)})
    rows.sort(key=lambda r: (r["actors"], r["transport"]))
    print_table(rows, ["transport", "actors", "req/s", "us/req", "p50 us", "p99 us", "batch"])
    med = {(r["transport"], r["actors"]): r["_req_s"] for r in rows}
    for n in a.actors:
        for name in ("rlserve/actor", "rlserve/driver"):
            if (name, n) in med and ("echo/wire", n) in med:
                print(f"{name} at {n} actors: per-request cost {med[('echo/wire', n)] / med[(name, n)]:.2f}x echo/wire")
    return rows


if __name__ == "__main__":
    main()
