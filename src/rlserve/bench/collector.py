"""Experience collection on CartPole-v1: AsyncBatchedCollector vs two single-thread loops.

* ``collector``: rlserve's AsyncBatchedCollector (one actor thread per env,
  batched server) yielding batches of ``--frames-per-batch``;
* ``per-env-calls``: one thread steps every env in turn, calling the policy
  once per step (batch of 1: what actors without a server do);
* ``sync-vector``: one thread steps all envs, then one batched forward for
  all of them (lock-step vectorised envs, the usual single-process choice).

Figures are frames/s of transitions handed to the caller. ``--step-ms`` adds
rows where every env step also sleeps that long (GIL released), standing for
envs whose step waits on a simulator in C, a GPU or another machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tensordict import TensorDict

from .common import print_table, summarize, wait_idle


def _policy():
    from ..demo.ppo import make_policy

    torch.manual_seed(0)
    return make_policy(4, 2)


class _Slow:
    """CartPole whose step also waits ``ms`` milliseconds with the GIL released."""

    def __init__(self, ms: float):
        import gymnasium as gym

        self.env, self.s = gym.make("CartPole-v1"), ms / 1e3

    def reset(self, seed=None):
        return self.env.reset(seed=seed)

    def step(self, a):
        time.sleep(self.s)
        return self.env.step(a)


def _make_env(ms: float = 0.0):
    if ms > 0:
        return _Slow(ms)
    import gymnasium as gym

    return gym.make("CartPole-v1")


def bench_collector(n: int, seconds: float, fpb: int, ms: float = 0.0) -> dict:
    from functools import partial

    from rlserve import AsyncBatchedCollector

    with AsyncBatchedCollector(partial(_make_env, ms), _policy(), fpb, -1, num_envs=n, seed=0, progress=False) as c:
        it = iter(c)
        next(it)  # warm-up batch
        frames = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            frames += next(it).shape[0]
        el = time.perf_counter() - t0
        batch = c.server.stats()["mean_batch_size"]
    return {"fps": frames / el, "batch": batch}


def _loop(n: int, seconds: float, batched: bool, ms: float = 0.0) -> dict:
    envs = [_make_env(ms) for _ in range(n)]
    obs = [torch.as_tensor(e.reset(seed=i)[0]) for i, e in enumerate(envs)]
    policy = _policy()
    frames = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t0 < seconds:
            if batched:
                out = policy(TensorDict(observation=torch.stack(obs), batch_size=[n]))
                actions = out["action"].tolist()
            else:
                actions = [policy(TensorDict(observation=o[None], batch_size=[1]))["action"].item() for o in obs]
            for i, (e, a) in enumerate(zip(envs, actions)):
                o, r, term, trunc, _ = e.step(a)
                if term or trunc:
                    o, _ = e.reset()
                obs[i] = torch.as_tensor(o)
            frames += n
    el = time.perf_counter() - t0
    return {"fps": frames / el, "batch": float(n if batched else 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, nargs="+", default=[4, 16, 64], help="environments")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames-per-batch", type=int, default=1024)
    ap.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 1.0],
                    help="extra sleep per env step, one set of rows each (default 0 1)")
    ap.add_argument("--no-wait-idle", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# collector benchmark: CartPole-v1, PPO policy MLP 64x64, {a.seconds}s x {a.repeats} repeats, "
          f"median [min-max] frames/s")
    res: dict = {}
    for _ in range(a.repeats):
        if not a.no_wait_idle:
            wait_idle()
        for ms in a.step_ms:
            for n in a.actors:
                fpb = min(a.frames_per_batch, max(n, int(a.seconds * n * 200))) if ms else a.frames_per_batch
                res.setdefault((ms, "collector", n), []).append(bench_collector(n, a.seconds, fpb, ms))
                res.setdefault((ms, "per-env-calls", n), []).append(_loop(n, a.seconds, False, ms))
                res.setdefault((ms, "sync-vector", n), []).append(_loop(n, a.seconds, True, ms))
    rows = [{
        "env": f"CartPole+{ms:g}ms" if ms else "CartPole", "transport": name, "actors": n,
        "frames/s": summarize([r["fps"] for r in rs]),
        "batch": f"{statistics.median(r['batch'] for r in rs):.1f}",
        "_req_s": statistics.median(r["fps"] for r in rs),
    } for (ms, name, n), rs in res.items()]
    print_table(rows, ["env", "transport", "actors", "frames/s", "batch"])
    return rows


if __name__ == "__main__":
    main()
