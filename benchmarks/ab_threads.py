"""A/B of two rlserve source trees on the thread path, alternating short runs (a noisy machine).

    git worktree add /tmp/rlserve-before <commit>
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ab_threads.py /tmp/rlserve-before/src src --actors 16 64 --repeats 5

Each run is a fresh process with the given tree first on ``sys.path``; the two
trees alternate (A B, then B A, ...), and each pair gives a ratio B / A. Prints
medians [min-max] of req/s, of context switches per request, and of the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _inner(n: int, seconds: float, prebuilt: bool) -> None:
    import importlib.util
    import itertools

    import rlserve
    import torch
    from rlserve import InferenceServer, ThreadingTransport
    from tensordict import TensorDict

    # The actor loop and policy of this checkout (either tree may predate them), loaded by path.
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "rlserve", "bench", "common.py")
    spec = importlib.util.spec_from_file_location("ab_common", here)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    make = None
    if prebuilt:
        pool = itertools.cycle([TensorDict(observation=torch.randn(8)) for _ in range(1024)])
        make = pool.__next__
    tr = ThreadingTransport()
    with InferenceServer(common.seed_policy(), tr, max_batch_size=32) as server:
        r = common.run_actor_threads(tr.client(), n, seconds, make_obs=make)
        r["batch"] = server.stats()["mean_batch_size"]
    r["src"] = os.path.dirname(os.path.dirname(rlserve.__file__))
    print(json.dumps(r))


def _run(src: str, n: int, seconds: float, prebuilt: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--inner", str(n), str(seconds), "1" if prebuilt else "0"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if os.path.abspath(r["src"]) != os.path.abspath(src):
        raise SystemExit(f"{src}: the run imported rlserve from {r['src']}")
    return r


def _fmt(xs: list, spec: str) -> str:
    return f"{statistics.median(xs):{spec}} [{min(xs):{spec}}-{max(xs):{spec}}]"


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--inner":
        _inner(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="source tree A (the directory holding the rlserve package)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--actors", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--prebuilt-obs", action="store_true")
    a = ap.parse_args(argv)
    print(f"# A = {a.a}, B = {a.b}; {a.repeats} pairs of {a.seconds}s runs per actor count, "
          + ("pre-built observations" if a.prebuilt_obs else "a fresh observation per step"))
    for n in a.actors:
        res = {"A": [], "B": []}
        for rep in range(a.repeats):
            order = ("A", "B") if rep % 2 == 0 else ("B", "A")
            for k in order:
                res[k].append(_run(a.a if k == "A" else a.b, n, a.seconds, a.prebuilt_obs))
        ratios = [b["req_s"] / x["req_s"] for x, b in zip(res["A"], res["B"])]
        for k in ("A", "B"):
            rs = res[k]
            print(f"{n:3d} actors  {k}: req/s {_fmt([r['req_s'] for r in rs], ',.0f')}  "
                  f"switches/req {_fmt([r['switches'] for r in rs], '.1f')}  "
                  f"batch {statistics.median(r['batch'] for r in rs):.1f}")
        print(f"{n:3d} actors  B / A: {_fmt(ratios, '.2f')}")


if __name__ == "__main__":
    main()
