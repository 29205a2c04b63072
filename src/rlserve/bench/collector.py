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

``--torchrl-env`` measures instead, on torchrl's ``GymEnv("CartPole-v1")``
(needs torchrl: run it with the side-by-side environment, ``make bench-env``),
side by side and alternating: torchrl 0.14's ``AsyncBatchedCollector`` and
rlserve's, with ``--threads`` env threads and with ``--procs`` env processes,
and the env-only floor: one thread looping ``env.step_and_maybe_reset``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

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


class _ArgmaxOneHot(torch.nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(logits.argmax(-1), 2)


def torchrl_policy() -> torch.nn.Module:
    """An MLP over CartPole's observation writing a one-hot action (GymEnv's action spec)."""
    from tensordict.nn import TensorDictModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2), _ArgmaxOneHot())
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


def gym_env() -> Any:
    """torchrl's GymEnv("CartPole-v1") (a module-level factory: picklable for env processes)."""
    from torchrl.envs import GymEnv

    return GymEnv("CartPole-v1")


def bench_torchrl_env(lib: str, n: int, backend: str, seconds: float, fpb: int) -> dict:
    """frames/s of ``lib``'s AsyncBatchedCollector over ``n`` GymEnv CartPole envs."""
    import warnings

    if lib == "torchrl":
        from torchrl.collectors import AsyncBatchedCollector
    else:
        from rlserve import AsyncBatchedCollector
    warnings.simplefilter("ignore", FutureWarning)
    c = AsyncBatchedCollector([gym_env] * n, policy=torchrl_policy(), frames_per_batch=fpb, total_frames=-1,
                              env_backend=backend)
    try:
        it = iter(c)
        for _ in range(2):  # start-up (processes import torch) and warm-up, not measured
            next(it)
        frames = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            frames += next(it).numel()
        el = time.perf_counter() - t0
        batch = c.server_stats()["avg_batch_size"]
    finally:
        c.shutdown()
    return {"fps": frames / el, "batch": batch}


def env_floor(seconds: float) -> dict:
    """One thread looping ``step_and_maybe_reset`` on one GymEnv, actions drawn beforehand."""
    env = gym_env()
    actions = [env.action_spec.rand() for _ in range(256)]
    td = env.reset()
    steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        td["action"] = actions[steps % 256]
        _, td = env.step_and_maybe_reset(td)
        steps += 1
    el = time.perf_counter() - t0
    return {"fps": steps / el, "batch": 1.0, "us_per_step": el / steps * 1e6}


def torchrl_env_main(a) -> list[dict]:
    import tensordict
    import torchrl

    print(f"# torchrl GymEnv CartPole-v1: torchrl {torchrl.__version__} vs rlserve, tensordict "
          f"{tensordict.__version__}, MLP 64, frames_per_batch={a.frames_per_batch}, {a.seconds}s x "
          f"{a.repeats} alternating repeats, median [min-max] frames/s")
    rows_spec = [("env-floor", 1, None)]
    for n in a.threads:
        rows_spec += [("torchrl", n, "threading"), ("rlserve", n, "threading")]
    for n in a.procs:
        rows_spec += [("torchrl", n, "multiprocessing"), ("rlserve", n, "multiprocessing")]
    res: dict = {}
    for rep in range(a.repeats):
        k = rep % 2  # alternate which library goes first
        order = rows_spec if k == 0 else [rows_spec[0]] + [r for pair in zip(rows_spec[2::2], rows_spec[1::2])
                                                           for r in pair]
        for lib, n, backend in order:
            if not a.no_wait_idle:
                wait_idle()
            r = env_floor(a.seconds) if lib == "env-floor" else bench_torchrl_env(
                lib, n, backend, a.seconds, a.frames_per_batch)
            res.setdefault((lib, n, backend), []).append(r)
            print(f"  {lib:9s} {backend or '':15s} envs={n:<3d} {r['fps']:8,.0f} frames/s", flush=True)
    rows = []
    for (lib, n, backend), rs in res.items():
        row = {"collector": lib, "env workers": f"{n} {'processes' if backend == 'multiprocessing' else 'threads'}"
               if backend else "1 thread, no policy", "frames/s": summarize([r["fps"] for r in rs]),
               "batch": f"{statistics.median(r['batch'] for r in rs):.1f}",
               "_req_s": statistics.median(r["fps"] for r in rs)}
        if lib == "rlserve":
            base = res.get(("torchrl", n, backend))
            if base:
                ratios = [b["fps"] / t["fps"] for b, t in zip(rs, base)]
                row["rlserve / torchrl"] = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        rows.append(row)
    print_table(rows, ["collector", "env workers", "frames/s", "batch", "rlserve / torchrl"])
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, nargs="+", default=[4, 16, 64], help="environments")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames-per-batch", type=int, default=1024)
    ap.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 1.0],
                    help="extra sleep per env step, one set of rows each (default 0 1)")
    ap.add_argument("--no-wait-idle", action="store_true")
    ap.add_argument("--torchrl-env", action="store_true",
                    help="rows on torchrl's GymEnv: torchrl's collector vs rlserve's, and the env-only floor")
    ap.add_argument("--threads", type=int, nargs="*", default=[16], help="--torchrl-env: env threads")
    ap.add_argument("--procs", type=int, nargs="*", default=[8], help="--torchrl-env: env processes")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.torchrl_env:
        return torchrl_env_main(a)
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
