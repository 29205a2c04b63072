"""AsyncBatchedCollector: real gymnasium envs, plain envs, errors, server death, weight updates."""
import time

import gymnasium as gym
import pytest
import torch
import torch.nn as nn
from tensordict.nn import TensorDictModule

from rlserve import AsyncBatchedCollector, ServerDeadError, WeightSyncScheme
from rlserve._env_actor import EnvError


class CartPolePolicy(nn.Module):
    """Samples an action from a linear layer's logits and reports its log-prob."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def forward(self, obs):
        logp = self.net(obs).log_softmax(-1)
        a = torch.multinomial(logp.exp(), 1)
        return a.squeeze(-1), logp.gather(-1, a).squeeze(-1)


def cartpole_policy():
    torch.manual_seed(0)
    return TensorDictModule(CartPolePolicy(), in_keys=["observation"], out_keys=["action", "action_log_prob"])


class CounterEnv:
    """Old gym API (reset -> obs, step -> 4-tuple): obs counts steps; reward echoes the action."""

    def __init__(self, horizon=5):
        self.horizon = horizon
        self.t = 0

    def reset(self):
        self.t = 0
        return [float(self.t)]

    def step(self, action):
        self.t += 1
        return [float(self.t)], float(action[0]), self.t >= self.horizon, {}


class BiasPolicy(nn.Module):
    """action = obs * 0 + bias: the action shows which weights answered."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, obs):
        return obs * 0 + self.bias


def bias_policy():
    return TensorDictModule(BiasPolicy(), in_keys=["observation"], out_keys=["action"])


def _assert_stopped(c):
    assert not c.server.is_alive
    assert not any(t.is_alive() for t in c._threads)


def test_cartpole_batches_have_torchrl_layout():
    fpb, n_envs = 64, 4
    c = AsyncBatchedCollector(lambda: gym.make("CartPole-v1"), cartpole_policy(), fpb, 3 * fpb,
                              num_envs=n_envs, seed=0)
    with c:
        batches = list(c)
    _assert_stopped(c)
    assert len(batches) == 3 and c.frames == 3 * fpb
    td = torch.cat(batches)
    n = td.shape[0]
    assert td["observation"].shape == (n, 4) and td["next", "observation"].shape == (n, 4)
    assert td["action"].shape == (n,) and td["action"].dtype == torch.int64
    assert set(td["action"].unique().tolist()) <= {0, 1}
    assert td["action_log_prob"].shape == (n,) and (td["action_log_prob"] <= 0).all()
    assert td["policy_version"].shape == (n,) and (td["policy_version"] == 0).all()
    for k in ("reward", "done", "terminated", "truncated"):
        assert td["next", k].shape == (n, 1), k
    assert (td["next", "reward"] == 1).all()
    assert td["next", "done"].dtype == torch.bool
    assert torch.equal(td["next", "done"], td["next", "terminated"] | td["next", "truncated"])
    for k in ("done", "terminated", "truncated"):  # root flags describe the acted-on state: never terminal
        assert td[k].shape == (n, 1) and not td[k].any()
    assert sorted(td["env_id"].unique().tolist()) == list(range(n_envs))
    assert td["next", "terminated"].any()  # a random policy drops the pole within 192 frames
    # per env, transitions are consecutive steps: next obs of step t is obs of step t+1 (unless done)
    for e in range(n_envs):
        s = td[td["env_id"] == e]
        cont = ~s["next", "done"][:-1, 0]
        assert torch.equal(s["next", "observation"][:-1][cont], s["observation"][1:][cont])
        assert not torch.equal(s["next", "observation"][:-1][~cont], s["observation"][1:][~cont]) or (~cont).sum() == 0
    assert c.episodes and all(ret == length for _, _, ret, length in c.episodes)


def test_plain_env_old_api_and_list_of_env_fns():
    fns = [lambda h=h: CounterEnv(h) for h in (3, 4, 5)]
    doubler = TensorDictModule(lambda o: o * 2, in_keys=["observation"], out_keys=["action"])
    with AsyncBatchedCollector(fns, doubler, 30, 60) as c:
        td = torch.cat(list(c))
    assert td.shape == (60,)
    assert torch.equal(td["action"], td["observation"] * 2)
    assert torch.equal(td["next", "reward"].squeeze(-1), td["action"].squeeze(-1))
    assert torch.equal(td["next", "observation"], td["observation"] + 1)
    for e, h in enumerate((3, 4, 5)):  # each env ends exactly at its own horizon
        s = td[td["env_id"] == e]
        assert torch.equal(s["next", "terminated"].squeeze(-1), s["next", "observation"].squeeze(-1) == h)
    assert not td["next", "truncated"].any()


class GymnasiumStyle:
    """reset -> (obs, info), step -> 5-tuple, with a time limit that truncates."""

    def reset(self, seed=None):
        self.t = 0
        return torch.tensor([0.0]), {}

    def step(self, action):
        self.t += 1
        return torch.tensor([float(self.t)]), 1.0, False, self.t >= 2, {}


def test_plain_env_gymnasium_api_truncation():
    with AsyncBatchedCollector(GymnasiumStyle, bias_policy(), 20, 20, num_envs=2) as c:
        td = next(iter(c))
    assert torch.equal(td["next", "truncated"].squeeze(-1), td["next", "observation"].squeeze(-1) == 2)
    assert not td["next", "terminated"].any()
    assert torch.equal(td["next", "done"], td["next", "truncated"])


class Exploding(CounterEnv):
    def step(self, action):
        if self.t == 2:
            raise ValueError("boom in physics")
        return super().step(action)


def test_env_error_names_env_and_error():
    fns = [lambda: CounterEnv(100)] * 2 + [Exploding, lambda: CounterEnv(100)]
    doubler = TensorDictModule(lambda o: o * 2, in_keys=["observation"], out_keys=["action"])
    c = AsyncBatchedCollector(fns, doubler, 1000, -1)
    t0 = time.monotonic()
    with pytest.raises(EnvError, match=r"environment 2 raised in step\(.*ValueError: boom in physics") as ei:
        with c:
            for _ in c:
                pass
    assert time.monotonic() - t0 < 10
    assert ei.value.env_id == 2 and isinstance(ei.value.__cause__, ValueError)
    _assert_stopped(c)


def test_env_creation_error():
    def bad():
        raise OSError("no display")

    c = AsyncBatchedCollector([lambda: CounterEnv(), bad], bias_policy(), 1000, -1)
    with pytest.raises(EnvError, match=r"environment 1 raised in create_env_fn\(\): OSError: no display"):
        with c:
            for _ in c:
                pass
    _assert_stopped(c)
    with pytest.raises(EnvError, match=r"environment 0 .*has no reset\(\) method"):
        with AsyncBatchedCollector(lambda: object(), bias_policy(), 10, 10) as c2:
            next(iter(c2))


def test_policy_error_reaches_the_caller():
    def broken(td):
        raise KeyError("the model needs 'pixels'")

    with AsyncBatchedCollector(lambda: CounterEnv(), broken, 10, 10, num_envs=2) as c:
        with pytest.raises(KeyError, match="pixels"):
            next(iter(c))


class DyingScheme(WeightSyncScheme):
    """A weight-sync scheme whose receive() breaks after a while: kills the serving loop."""

    def __init__(self, after):
        self.calls = 0
        self.after = after

    def send(self, model=None, weights=None):
        return 0

    def receive(self):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("shared memory vanished")
        return None


def test_server_death_does_not_hang():
    c = AsyncBatchedCollector(lambda: gym.make("CartPole-v1"), cartpole_policy(), 10_000, -1, num_envs=4,
                              weight_sync=DyingScheme(after=50))
    t0 = time.monotonic()
    with pytest.raises(ServerDeadError, match="shared memory vanished"):
        with c:
            for _ in c:
                pass
    assert time.monotonic() - t0 < 10  # generous: detection is within ~0.2 s
    _assert_stopped(c)


def test_update_policy_weights_changes_version_and_actions():
    with AsyncBatchedCollector(lambda: CounterEnv(1000), bias_policy(), 64, -1, num_envs=4,
                               max_buffered_frames=64) as c:
        it = iter(c)
        first = next(it)
        assert (first["policy_version"] == 0).all() and (first["action"] == 0).all()
        v = c.update_policy_weights_({"module.bias": torch.tensor([7.0])})
        assert v == 1 and c.policy_version == 1
        seen = torch.cat([next(it) for _ in range(6)])
    new = seen["policy_version"] == 1
    assert new.any()
    # every transition's stamp names the weights that chose its action
    assert (seen["action"][new] == 7).all() and (seen["action"][~new] == 0).all()
    assert set(seen["policy_version"].tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="weights"):
        c.update_policy_weights_()


def test_weight_sync_scheme_lag_visible():
    from rlserve import SharedMemWeightSyncScheme

    trainer = bias_policy()
    scheme = SharedMemWeightSyncScheme()
    scheme.init_on_sender(model=trainer)
    with AsyncBatchedCollector(lambda: CounterEnv(1000), bias_policy(), 32, -1, num_envs=4,
                               weight_sync=scheme, max_buffered_frames=32) as c:
        versions_td = []
        for i, td in zip(range(8), c):
            versions_td.append(td)
            assert torch.equal(td["action"].squeeze(-1), td["policy_version"].float())  # bias == version
            with torch.no_grad():
                trainer.module.bias.fill_(i + 1)
            assert c.update_policy_weights_(trainer) == i + 1
    td = torch.cat(versions_td)
    assert td["policy_version"].max() >= 5  # the actors followed the trainer
    for e in range(4):  # each actor sees versions only move forward
        assert td["policy_version"][td["env_id"] == e].diff().ge(0).all()


def test_backpressure_bounds_buffer():
    with AsyncBatchedCollector(lambda: CounterEnv(1000), bias_policy(), 16, -1, num_envs=4,
                               max_buffered_frames=32) as c:
        next(iter(c))
        time.sleep(0.5)  # nobody reads: the actors must pause
        buffered = len(c._sink.buf)
    assert 16 <= buffered <= 32 + 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="frames_per_batch"):
        AsyncBatchedCollector(lambda: CounterEnv(), bias_policy(), 0)
    with pytest.raises(TypeError, match="create_env_fn"):
        AsyncBatchedCollector("CartPole-v1", bias_policy(), 10)
    with pytest.raises(ValueError, match="num_envs"):
        AsyncBatchedCollector([CounterEnv, CounterEnv], bias_policy(), 10, num_envs=3)
