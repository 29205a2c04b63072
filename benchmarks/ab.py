"""A/B of two rlserve source trees, alternating short runs (this machine is shared and noisy).

    git worktree add /tmp/rlserve-before <commit>
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ab.py /tmp/rlserve-before/src src \\
        --rows threads:1 threads:16 threads:64 mp:8 ray:4 --repeats 5

Rows: ``threads:N`` (N actor threads, ThreadingTransport, a fresh observation
per step unless ``--prebuilt-obs``), ``mp:N`` (N actor processes, MPTransport
with the server in the benchmark process), ``ray:N`` (N Ray actors, the
server in a Ray actor): the seed policy, ``max_batch_size=32``;
``collector:N`` (AsyncBatchedCollector, N gymnasium CartPole-v1 envs on
actor threads, frames/s).

Each run is a fresh process with the given tree first on ``PYTHONPATH`` (actor
processes and Ray workers inherit it); the two trees alternate (A B, then
B A, ...), each pair gives a ratio B / A, and ``../shared/tools/wait-idle``
runs before each pair. The thread loop is this checkout's
(``rlserve/bench/common.py``, loaded by path); MP, Ray and collector rows
use each tree's own benchmark module. Prints medians [min-max] of req/s, and of the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Before Ray is imported (either tree's benchmark may start it): Ray on 127.0.0.1 only (Ray 2.60).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _common():
    import importlib.util

    path = os.path.join(_HERE, "..", "src", "rlserve", "bench", "common.py")
    spec = importlib.util.spec_from_file_location("ab_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inner(kind: str, n: int, seconds: float, prebuilt: bool) -> None:
    import rlserve
    import torch
    from tensordict import TensorDict

    common = _common()
    r: dict = {}
    if kind == "threads":
        import itertools

        from rlserve import InferenceServer, ThreadingTransport

        make = None
        if prebuilt:
            pool = itertools.cycle([TensorDict(observation=torch.randn(8)) for _ in range(1024)])
            make = pool.__next__
        tr = ThreadingTransport()
        with InferenceServer(common.seed_policy(), tr, max_batch_size=32) as server:
            r = common.run_actor_threads(tr.client(), n, seconds, make_obs=make)
            r["batch"] = server.stats()["mean_batch_size"]
    elif kind == "mp":
        from rlserve.bench.processes import bench_rlserve

        r = bench_rlserve(n, "vector", seconds, 32)
    elif kind == "collector":
        from rlserve.bench.collector import bench_collector

        r = bench_collector(n, seconds, 1024)
        r["req_s"] = r["fps"]
    elif kind == "ray":
        import ray
        from rlserve.bench.ray_actors import bench_actor_hosted, init_ray

        init_ray()
        try:
            r = bench_actor_hosted(n, seconds)
        finally:
            ray.shutdown()
    else:
        raise SystemExit(f"unknown row kind {kind!r}")
    r["src"] = os.path.dirname(os.path.dirname(rlserve.__file__))
    print("JSON " + json.dumps(r))


def _run(src: str, row: str, seconds: float, prebuilt: bool) -> dict:
    kind, n = row.split(":")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--inner", kind, n, str(seconds), "1" if prebuilt else "0"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("JSON ")][-1]
    r = json.loads(line[5:])
    if os.path.abspath(r["src"]) != os.path.abspath(src):
        raise SystemExit(f"{src}: the run imported rlserve from {r['src']}")
    return r


def _fmt(xs: list, spec: str) -> str:
    return f"{statistics.median(xs):{spec}} [{min(xs):{spec}}-{max(xs):{spec}}]"


def _wait_idle() -> None:
    tool = os.path.join(_HERE, "..", "..", "shared", "tools", "wait-idle")
    if os.path.exists(tool):
        subprocess.run([sys.executable, tool, "--max", "60"], check=False)


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--inner":
        _inner(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="source tree A (the directory holding the rlserve package)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--rows", nargs="+", default=["threads:1", "threads:16", "threads:64", "mp:8", "ray:4"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--prebuilt-obs", action="store_true", help="thread rows: actors reuse pre-built observations")
    ap.add_argument("--no-wait-idle", action="store_true")
    a = ap.parse_args(argv)
    print(f"# A = {a.a}, B = {a.b}; {a.repeats} alternating pairs of {a.seconds}s runs per row, "
          + ("pre-built observations" if a.prebuilt_obs else "a fresh observation per step"), flush=True)
    for row in a.rows:
        res: dict = {"A": [], "B": []}
        for rep in range(a.repeats):
            if not a.no_wait_idle:
                _wait_idle()
            order = ("A", "B") if rep % 2 == 0 else ("B", "A")
            for k in order:
                res[k].append(_run(a.a if k == "A" else a.b, row, a.seconds, a.prebuilt_obs))
        ratios = [b["req_s"] / x["req_s"] for x, b in zip(res["A"], res["B"])]
        for k in ("A", "B"):
            rs = res[k]
            extra = f"  switches/req {_fmt([r['switches'] for r in rs], '.1f')}" if "switches" in rs[0] else ""
            print(f"{row:>11}  {k}: req/s {_fmt([r['req_s'] for r in rs], ',.0f')}  "
                  f"batch {statistics.median(r['batch'] for r in rs):.1f}{extra}")
        print(f"{row:>11}  B / A: {_fmt(ratios, '.2f')}", flush=True)


if __name__ == "__main__":
    main()
