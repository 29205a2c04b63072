"""The main job: PPO on CartPole-v1, actors served by rlserve, weights pushed by a sync scheme."""
from __future__ import annotations

import copy
import functools
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from .ppo import PPO, PPOConfig, make_policy


@dataclass
class DemoConfig:
    env: str = "CartPole-v1"
    envs: int = 16
    time_limit: float = 300.0
    target: float = 475.0
    window: int = 50  # episodes averaged for the stop rule
    frames_per_batch: int = 2048
    seed: int = 0
    hidden: int = 64
    progress: bool | None = None
    actor_type: str = "thread"  # or "process": envs in child processes, served through MPTransport
    torchrl_env: bool = False  # step torchrl's GymEnv (needs torchrl) instead of gymnasium's env
    ppo: PPOConfig = field(default_factory=PPOConfig)


def _make_scheme():
    """The shared-memory scheme when it is built; None falls back to update_policy_weights_."""
    try:
        from rlserve import SharedMemWeightSyncScheme
    except (ImportError, AttributeError):
        return None
    return SharedMemWeightSyncScheme()


def train(cfg: DemoConfig, log=print) -> dict:
    """Train until the mean return of the last ``cfg.window`` episodes reaches the target
    or ``cfg.time_limit`` passes; return the figures of the run."""
    import gymnasium as gym

    from rlserve import AsyncBatchedCollector

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    probe = gym.make(cfg.env)
    obs_dim, n_act = probe.observation_space.shape[0], int(probe.action_space.n)
    probe.close()

    served = make_policy(obs_dim, n_act, cfg.hidden)  # the server's copy
    trainer_policy = copy.deepcopy(served)  # the trainer's copy, pushed after each update
    ppo = PPO(trainer_policy, obs_dim, cfg.ppo, cfg.hidden)
    scheme = _make_scheme()
    if scheme is not None:
        scheme.init_on_sender(model=trainer_policy)

    if cfg.torchrl_env:
        try:
            from torchrl.envs import GymEnv
        except ImportError:
            raise ImportError("the demo's torchrl env option needs torchrl installed (pip install torchrl)") from None
        make_env = functools.partial(GymEnv, cfg.env, categorical_action_encoding=True)
    else:
        make_env = functools.partial(gym.make, cfg.env)
    collector = AsyncBatchedCollector(
        make_env, served, cfg.frames_per_batch, -1, num_envs=cfg.envs,
        weight_sync=scheme, seed=cfg.seed, progress=False, actor_type=cfg.actor_type,
    )
    curve = []  # (seconds since start, mean return of the window)
    lags: list[int] = []
    updates = 0
    solved_at = None
    t_train = 0.0
    mean_ret = float("nan")
    bar = _bar(cfg)
    with collector:
        t0 = time.monotonic()
        while True:
            left = cfg.time_limit - (time.monotonic() - t0)
            if left <= 0:
                break
            try:
                td = collector.next_batch(timeout=left)
            except TimeoutError:
                break
            version = collector.policy_version
            lags.extend((version - td["policy_version"]).tolist())
            t1 = time.monotonic()
            ppo.update(td)
            # through the scheme when there is one (scheme.send), else server.update_weights
            collector.update_policy_weights_(trainer_policy)
            t_train += time.monotonic() - t1
            updates += 1
            eps = collector.episodes
            if eps:
                mean_ret = statistics.fmean(e[2] for e in eps[-cfg.window:])
                curve.append((time.monotonic() - t0, mean_ret))
            if bar is not None:
                bar.update(td.shape[0])
                bar.set_postfix(ret=f"{mean_ret:.0f}", v=version + 1)
            if len(eps) >= cfg.window and mean_ret >= cfg.target:
                solved_at = time.monotonic() - t0
                break
        elapsed = time.monotonic() - t0
        st = collector.stats()
        episodes = collector.episodes
    if bar is not None:
        bar.close()
    srv = st["server"]
    return {
        "env": cfg.env,
        "envs": cfg.envs,
        "actor_type": cfg.actor_type,
        "env_kind": "torchrl GymEnv" if cfg.torchrl_env else "gymnasium",
        "weight_sync": type(scheme).__name__ if scheme is not None else "update_policy_weights_",
        "solved": solved_at is not None,
        "solve_time_s": solved_at,
        "elapsed_s": elapsed,
        "time_limit_s": cfg.time_limit,
        "target": cfg.target,
        "window": cfg.window,
        "final_return": mean_ret,
        "frames": st["frames"],
        "frames_per_s": st["frames"] / elapsed if elapsed > 0 else 0.0,
        "updates": updates,
        "train_time_s": t_train,
        "episodes": len(episodes),
        "episode_log": [(t - collector.started_at, r) for t, _, r, _ in episodes],
        "curve": curve,
        "mean_batch_size": srv["mean_batch_size"],
        "batch_size_hist": srv["batch_size_hist"],
        "latency_ms": srv["latency_ms"],
        "queue_wait_ms": srv["queue_wait_ms"],
        "lag_mean": statistics.fmean(lags) if lags else float("nan"),
        "lag_max": max(lags) if lags else 0,
        "policy_version": srv["policy_version"],
    }


def _bar(cfg: DemoConfig):
    import sys

    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(unit="frame", dynamic_ncols=True, desc="training")
