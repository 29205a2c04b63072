"""Weight sync costs: trainer-side send(), delay until answers carry the new version,
and serving throughput while weights are sent every 10 ms versus never.

Two placements: ``thread`` (SharedMemWeightSyncScheme, trainer thread in the
server's process) and ``process`` (MultiProcessWeightSyncScheme, server and
its actor threads in a spawned process, trainer here).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from .common import pct, print_table, run_actor_threads, summarize, wait_idle

OBS = 64
SIZES = {"1M": 700, "50M": 5000}  # hidden width -> about 1.03M / 50.4M parameters
_perf = time.perf_counter


def mlp(width: int) -> TensorDictModule:
    net = nn.Sequential(
        nn.Linear(OBS, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8),
    )
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _obs():
    return TensorDict(observation=torch.randn(OBS))


def _nudge(model) -> None:
    """Stand-in for optimizer.step(): change the weights in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-6)


# -- one process: a trainer thread beside the server ----------------------------------
def _latency_thread(width: int, n: int) -> dict:
    from rlserve import InferenceServer, SharedMemWeightSyncScheme, ThreadingTransport

    trainer, served = mlp(width), mlp(width)
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    sends, delays = [], []
    with InferenceServer(served, ThreadingTransport(), weight_sync=scheme) as server:
        client = server.client()
        client(_obs(), timeout=60)
        for _ in range(n):
            _nudge(trainer)
            t0 = _perf()
            v = scheme.send(model=trainer)
            sends.append(_perf() - t0)
            while int(client(_obs(), timeout=60)["policy_version"]) < v:
                pass
            delays.append(_perf() - t0)
    return {"send_ms": statistics.median(sends) * 1e3, "served_ms": statistics.median(delays) * 1e3,
            "served_p90_ms": pct(delays, 0.9) * 1e3}


def _throughput_thread(width: int, actors: int, seconds: float, period: float | None) -> dict:
    from rlserve import InferenceServer, SharedMemWeightSyncScheme, ThreadingTransport

    trainer, served = mlp(width), mlp(width)
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    stop = threading.Event()

    def train():
        nxt = _perf()
        while not stop.is_set():
            nxt += period
            scheme.send(model=trainer)  # same bytes each time: the copy costs the same
            time.sleep(max(0.0, nxt - _perf()))

    with InferenceServer(served, ThreadingTransport(), weight_sync=scheme) as server:
        t = threading.Thread(target=train, daemon=True) if period else None
        if t:
            t.start()
        v0 = server.policy_version
        r = run_actor_threads(server.client(), actors, seconds, make_obs=_obs)
        stop.set()
        if t:
            t.join(10)
        r["applied"] = server.policy_version - v0
    return r


# -- two processes: server + actors in a spawned child, trainer here ------------------
def _child(scheme, width, actors, seconds, conn):
    torch.set_num_threads(1)
    from rlserve import InferenceServer, ThreadingTransport

    firsts: dict = {}
    with InferenceServer(mlp(width), ThreadingTransport(), weight_sync=scheme) as server:
        client = server.client()

        def call(td):
            out = client(td, timeout=60)
            v = int(out["policy_version"])
            if v not in firsts:
                firsts[v] = _perf()  # CLOCK_MONOTONIC: comparable across processes
            return out

        conn.send("ready")
        conn.recv()
        v0 = server.policy_version
        r = run_actor_threads(call, actors, seconds, make_obs=_obs)
        r["applied"] = server.policy_version - v0
        r["firsts"] = firsts
    conn.send(r)


def _run_process(width: int, actors: int, seconds: float, period: float | None) -> dict:
    from rlserve import MultiProcessWeightSyncScheme

    ctx = mp.get_context("spawn")
    trainer = mlp(width)
    scheme = MultiProcessWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    here, there = ctx.Pipe()
    p = ctx.Process(target=_child, args=(scheme, width, actors, seconds, there), daemon=True)
    p.start()
    sends, starts = [], {}
    try:
        if not here.poll(120):
            raise RuntimeError("server process did not start")
        here.recv()
        here.send("go")
        nxt = _perf()
        while not here.poll(0):
            if period:
                nxt += period
                t0 = _perf()
                v = scheme.send(model=trainer)
                sends.append(_perf() - t0)
                starts[v] = t0
                time.sleep(max(0.0, nxt - _perf()))
            else:
                time.sleep(0.01)
        r = here.recv()
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    delays = [r["firsts"][v] - t for v, t in starts.items() if v in r["firsts"]]
    r.pop("firsts")
    if sends:
        r["send_ms"] = statistics.median(sends) * 1e3
        r["served_ms"] = statistics.median(delays) * 1e3 if delays else float("nan")
    return r


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--placements", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    ap.add_argument("--actors", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--period-ms", type=float, default=10.0)
    ap.add_argument("--latency-samples", type=int, default=30)
    ap.add_argument("--no-wait-idle", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    period = args.period_ms / 1e3
    rows = []
    for size in args.sizes:
        width = SIZES[size]
        params = f"{n_params(mlp(width)) / 1e6:.1f}M"
        for place in args.placements:
            lat_send, lat_served, tp_never, tp_upd, applied = [], [], [], [], []
            for _ in range(args.repeats):
                if not args.no_wait_idle:
                    wait_idle()
                if place == "thread":
                    lat = _latency_thread(width, args.latency_samples)
                    never = _throughput_thread(width, args.actors, args.seconds, None)
                    upd = _throughput_thread(width, args.actors, args.seconds, period)
                else:
                    never = _run_process(width, args.actors, args.seconds, None)
                    upd = lat = _run_process(width, args.actors, args.seconds, period)
                lat_send.append(lat["send_ms"])
                lat_served.append(lat["served_ms"])
                tp_never.append(never["req_s"])
                tp_upd.append(upd["req_s"])
                applied.append(upd["applied"])
            ratio = [u / n for u, n in zip(tp_upd, tp_never)]
            rows.append({
                "model": params, "placement": place,
                "send_ms": _fmt(lat_send), "served_ms": _fmt(lat_served),
                "req_s_never": summarize(tp_never), f"req_s_every_{args.period_ms:g}ms": summarize(tp_upd),
                "ratio": f"{statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]",
                "applied": f"{statistics.median(applied):.0f}",
            })
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    return rows


def _fmt(xs) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
