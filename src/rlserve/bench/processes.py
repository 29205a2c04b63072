"""Actor processes against MPTransport, next to direct calls and torchrl's process transports.

Each of N spawned actor processes loops ``client(TensorDict(observation=...))``
(the seed policy's loop) for ``--seconds``; processes are started and warmed
up first (one request each) and then released together, so spawn and import
time is not measured. torchrl's ``MPTransport`` and ``ProcessSlotTransport``
(its fastest process transport in 0.14) run in the same invocation when
torchrl is importable (run this with the torchrl venv for that).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from tensordict import TensorDict

from .common import pct, print_table, seed_policy, summarize, wait_idle

IMG = (3, 84, 84)


def _obs(kind: str):
    if kind == "image":
        return torch.randint(0, 255, IMG, dtype=torch.uint8)
    return torch.randn(8)


def image_policy():
    """uint8 3x84x84 -> 4 actions: scale, flatten, one Linear (cheap forward, big input)."""
    from tensordict.nn import TensorDictModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(-3), torch.nn.Linear(3 * 84 * 84, 4))

    class Scale(torch.nn.Module):
        def forward(self, x):
            return net(x.float() / 255.0)

    return TensorDictModule(Scale(), in_keys=["observation"], out_keys=["action"])


class DirectCall:
    """Picklable stand-in for a client: each process runs the policy itself."""

    def __init__(self, kind: str):
        self.kind = kind
        self.policy = None

    def __call__(self, td):
        if self.policy is None:
            self.policy = image_policy() if self.kind == "image" else seed_policy()
            torch.set_grad_enabled(False)
        return self.policy(td)


def _actor(call, kind, ready, go, seconds, results):
    torch.set_num_threads(1)
    try:
        call(TensorDict(observation=_obs(kind)))  # warm-up (registers the client)
        ready.put(os.getpid())
        go.wait(120)
        lat = []
        perf = time.perf_counter
        t_end = perf() + seconds
        while True:
            td = TensorDict(observation=_obs(kind))
            t0 = perf()
            call(td)
            t1 = perf()
            lat.append(t1 - t0)
            if t1 >= t_end:
                break
        results.put((len(lat), seconds, pct(lat, 0.5), pct(lat, 0.99)))
    except BaseException as e:  # report, never hang the driver
        results.put((0, repr(e), 0, 0))


def run_actor_processes(calls: list, kind: str, seconds: float) -> dict:
    """One spawned process per entry of ``calls``; returns req/s and latency figures."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_actor, args=(c, kind, ready, go, seconds, results), daemon=True) for c in calls]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=180)
        go.set()
        outs = [results.get(timeout=seconds + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    bad = [o[1] for o in outs if isinstance(o[1], str)]
    if bad:
        raise RuntimeError(f"actor failures: {bad}")
    total = sum(o[0] for o in outs)
    window = max(o[1] for o in outs)
    return {
        "req_s": total / window,
        "p50_us": statistics.median(o[2] for o in outs) * 1e6,
        "p99_us": max(o[3] for o in outs) * 1e6,
    }


def _policy(kind):
    return image_policy() if kind == "image" else seed_policy()


def bench_rlserve(n, kind, seconds, max_batch, spin_us=None) -> dict:
    from rlserve import InferenceServer, MPTransport

    resp = TensorDict(action=torch.zeros(4)) if kind == "image" else None
    tr = MPTransport(response_example=resp, spin_us=spin_us)
    with InferenceServer(_policy(kind), tr, max_batch_size=max_batch) as server:
        r = run_actor_processes([tr.client() for _ in range(n)], kind, seconds)
        r["batch"] = server.stats()["mean_batch_size"]
        u = tr.usage()
    r["pickled"] = u["pickled_requests"] + u["pickled_answers"]
    return r


def bench_process_server(n, kind, seconds, max_batch) -> dict:
    from rlserve import ProcessServer

    factory = image_policy if kind == "image" else seed_policy
    with ProcessServer(factory, max_batch_size=max_batch) as ps:
        r = run_actor_processes([ps.client() for _ in range(n)], kind, seconds)
        r["batch"] = ps.stats()["mean_batch_size"]
    return r


def bench_direct(n, kind, seconds, max_batch) -> dict:
    r = run_actor_processes([DirectCall(kind) for _ in range(n)], kind, seconds)
    r["batch"] = 1.0
    return r


def _torchrl(name):
    try:
        import torchrl.modules.inference_server as IS
    except ImportError:
        return None
    return getattr(IS, name, None)


def bench_torchrl_mp(n, kind, seconds, max_batch) -> dict | None:
    MP, IS = _torchrl("MPTransport"), _torchrl("InferenceServer")
    if MP is None:
        return None
    tr = MP(mp.get_context("spawn"))
    clients = [tr.client() for _ in range(n)]  # torchrl needs them before the server starts
    with IS(_policy(kind), tr, max_batch_size=max_batch):
        r = run_actor_processes(clients, kind, seconds)
    r["batch"] = float("nan")
    return r


def bench_torchrl_slot(n, kind, seconds, max_batch) -> dict | None:
    Slot, IS = _torchrl("ProcessSlotTransport"), _torchrl("InferenceServer")
    if Slot is None:
        return None
    req = TensorDict(observation=_obs(kind))
    resp = TensorDict(action=torch.zeros(4), policy_version=torch.zeros((), dtype=torch.long))
    tr = Slot(req, resp, num_slots=n)
    clients = [tr.client() for _ in range(n)]
    with IS(_policy(kind), tr, max_batch_size=max_batch):
        r = run_actor_processes(clients, kind, seconds)
    r["batch"] = float("nan")
    return r


MODES = {
    "rlserve": bench_rlserve,
    "rlserve-spin": lambda n, kind, seconds, max_batch: bench_rlserve(n, kind, seconds, max_batch, spin_us=100),
    "rlserve-procserver": bench_process_server,
    "direct": bench_direct,
    "torchrl-mp": bench_torchrl_mp,
    "torchrl-slot": bench_torchrl_slot,
}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "rlserve-spin"], choices=list(MODES))
    ap.add_argument("--image-procs", type=int, default=8, help="processes for the 3x84x84 uint8 run (0: skip)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--no-wait-idle", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import tensordict

    print(f"# processes benchmark: torch {torch.__version__}, tensordict {tensordict.__version__}, "
          f"torchrl {'yes' if _torchrl('InferenceServer') else 'not installed'}, max_batch_size={a.max_batch}, "
          f"{a.seconds}s x {a.repeats} repeats, median [min-max]", flush=True)
    runs = [("vector", n) for n in a.procs]
    if a.image_procs:
        runs.append(("image", a.image_procs))
    results: dict = {}
    for _ in range(a.repeats):
        if not a.no_wait_idle:
            wait_idle()
        for kind, n in runs:
            for mode in a.modes:
                if kind == "image" and mode == "rlserve-procserver":
                    continue
                r = MODES[mode](n, kind, a.seconds, a.max_batch)
                if r is not None:
                    results.setdefault((mode, kind, n), []).append(r)
    rows = []
    obs_bytes = {"vector": 8 * 4, "image": 3 * 84 * 84}
    for (mode, kind, n), rs in results.items():
        med = statistics.median(r["req_s"] for r in rs)
        rows.append({
            "transport": mode, "obs": kind, "procs": n,
            "req/s": summarize([r["req_s"] for r in rs]),
            "MB/s in": f"{med * obs_bytes[kind] / 1e6:.1f}",
            "p50 us": f"{statistics.median(r['p50_us'] for r in rs):.0f}",
            "p99 us": f"{statistics.median(r['p99_us'] for r in rs):.0f}",
            "batch": f"{statistics.median(r['batch'] for r in rs):.1f}",
            "pickled": str(max(r.get("pickled", 0) for r in rs)) if mode in ("rlserve", "rlserve-spin") else "",
            "_req_s": med,
        })
    rows.sort(key=lambda r: (r["obs"] != "vector", r["transport"], r["procs"]))
    print_table(rows, ["transport", "obs", "procs", "req/s", "MB/s in", "p50 us", "p99 us", "batch", "pickled"])
    med = {(r["transport"], r["obs"], r["procs"]): r["_req_s"] for r in rows}
    for (mode, kind, n), v in sorted(med.items()):
        if mode == "rlserve":
            for ref in ("torchrl-mp", "torchrl-slot"):
                if (ref, kind, n) in med:
                    print(f"rlserve / {ref} ({kind}, {n} procs): {v / med[(ref, kind, n)]:.1f}x")
    return rows


if __name__ == "__main__":
    main()
