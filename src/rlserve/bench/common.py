"""Shared benchmark pieces: the seed policy, actor loops, figures, repetition."""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Before Ray is imported (it reads this once): every Ray process a benchmark starts listens on
# 127.0.0.1 only (Ray 2.60; else it listens on every interface).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402


def seed_policy(obs_dim: int = 8, act_dim: int = 4) -> TensorDictModule:
    """The policy of the seed documents: Linear(8,64)-ReLU-Linear(64,4)."""
    torch.manual_seed(0)
    return TensorDictModule(
        nn.Sequential(nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, act_dim)),
        in_keys=["observation"],
        out_keys=["action"],
    )


def pct(vals, q):
    if not vals:
        return float("nan")
    s = sorted(vals)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_actor_threads(call, n_actors: int, seconds: float, make_obs=None, warmup: float = 0.3) -> dict:
    """``n_actors`` threads loop ``call(TensorDict(observation=...))``; returns figures."""
    make_obs = make_obs or (lambda: TensorDict(observation=torch.randn(8)))
    stop = threading.Event()
    measuring = threading.Event()
    counts = [0] * n_actors
    lats: list[list[float]] = [[] for _ in range(n_actors)]
    errors: list = []

    def actor(i):
        perf = time.perf_counter
        lat = lats[i]
        try:
            while not stop.is_set():
                td = make_obs()
                t0 = perf()
                call(td)
                if measuring.is_set():
                    lat.append(perf() - t0)
                    counts[i] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=actor, args=(i,), daemon=True) for i in range(n_actors)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    measuring.set()
    t0 = time.perf_counter()
    sw0 = _voluntary_switches()
    time.sleep(seconds)
    measuring.clear()
    sw1 = _voluntary_switches()
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(10)
    if errors:
        raise errors[0]
    all_lat = [x for lat in lats for x in lat]
    return {
        "req_s": sum(counts) / elapsed,
        "p50_us": pct(all_lat, 0.5) * 1e6,
        "p99_us": pct(all_lat, 0.99) * 1e6,
        # a thread that blocks (lock, GIL) switches out: each costs a sleep and a wake-up
        "switches": (sw1 - sw0) / max(1, sum(counts)),
    }


def _voluntary_switches() -> int:
    """Voluntary context switches of this process so far (all its threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def wait_idle(max_s: float = 60) -> None:
    """Run ../shared/tools/wait-idle when it exists (benchmarks on a shared box)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        tool = parent.parent / "shared" / "tools" / "wait-idle"
        if tool.exists():
            subprocess.run([sys.executable, str(tool), "--max", str(max_s)], check=False)
            return


def summarize(samples: list[float]) -> str:
    """median [min-max] of repeated figures."""
    if not samples:
        return "-"
    med = statistics.median(samples)
    return f"{med:,.0f} [{min(samples):,.0f}-{max(samples):,.0f}]"


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def batch_meter(stats_fn):
    """Start measuring; the returned callable gives the mean batch size since then."""
    s0 = stats_fn()

    def done():
        s1 = stats_fn()
        b = s1["batches"] - s0["batches"]
        return (s1["requests"] - s0["requests"]) / b if b else float("nan")

    return done
