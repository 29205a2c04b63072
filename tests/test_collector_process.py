"""AsyncBatchedCollector with actor_type="process": envs in spawned children, served through MPTransport."""
import functools
import os
import time

import gymnasium as gym
import pytest
import torch

from rlserve import AsyncBatchedCollector
from rlserve import EnvError
from rlserve.demo.ppo import make_policy


class CrashingCartPole:
    """CartPole whose 5th step fails: by raising, or by killing its own process outright."""

    def __init__(self, how):
        self.env = gym.make("CartPole-v1")
        self.how = how
        self.t = 0

    def reset(self, seed=None):
        return self.env.reset(seed=seed)

    def step(self, action):
        self.t += 1
        if self.t == 5:
            if self.how == "raise":
                raise ArithmeticError("pole fell through the floor")
            os._exit(3)  # no Python cleanup, no message: only the exit code tells
        return self.env.step(action)


def _policy():
    torch.manual_seed(0)
    return make_policy(4, 2)


def test_process_actors_cartpole_layout():
    make = functools.partial(gym.make, "CartPole-v1")
    with AsyncBatchedCollector(make, _policy(), 64, -1, num_envs=2, actor_type="process", seed=0) as c:
        batches = []
        for b in c:  # the children start at different times: read until both have spoken
            batches.append(b)
            if len(torch.cat(batches)["env_id"].unique()) == 2 or len(batches) > 2000:
                break
        td = torch.cat(batches)
        parent = os.getpid()
        pids = [p.pid for p in c._threads[0].procs]  # white-box on purpose: the actor processes
    n = td.shape[0]
    assert all(b.shape == (64,) for b in batches) and c.frames == n
    assert parent not in pids and len(set(pids)) == 2
    assert td["observation"].shape == (n, 4) and td["next", "reward"].shape == (n, 1)
    assert td["action_log_prob"].shape == (n,) and (td["policy_version"] == 0).all()
    assert sorted(td["env_id"].unique().tolist()) == [0, 1]
    for e in range(2):  # per env, consecutive steps chain up
        s = td[td["env_id"] == e]
        cont = ~s["next", "done"][:-1, 0]
        assert torch.equal(s["next", "observation"][:-1][cont], s["observation"][1:][cont])
    assert not any(p.is_alive() for p in c._threads[0].procs)


@pytest.mark.parametrize("how,match", [
    ("raise", r"environment 1 raised in step\(.*ArithmeticError: pole fell through the floor"),
    ("exit", r"environment 1 raised in its actor process: RuntimeError: the process exited with code 3 "),
])
def test_process_actor_failure_names_env(how, match):
    fns = [functools.partial(gym.make, "CartPole-v1"), functools.partial(CrashingCartPole, how)]
    c = AsyncBatchedCollector(fns, _policy(), 10_000, -1, actor_type="process")
    t0 = time.monotonic()
    with pytest.raises(EnvError, match=match):
        with c:
            for _ in c:
                pass
    assert time.monotonic() - t0 < 60  # generous: child start-up (spawn + import torch) dominates
    assert not any(p.is_alive() for p in c._threads[0].procs)


def test_process_actors_need_picklable_env_fn():
    with pytest.raises(TypeError, match="env 0 cannot be pickled.*functools.partial"):
        AsyncBatchedCollector(lambda: gym.make("CartPole-v1"), _policy(), 64, num_envs=2, actor_type="process")
