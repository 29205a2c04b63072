"""AsyncBatchedCollector on torchrl environments: whole step TensorDicts, recurrent state, replay buffers.

Runs where torchrl is installed (the tensordict 0.14.3 leg of ``make test``).
"""
import functools
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

torchrl = pytest.importorskip("torchrl")
pytest.importorskip("gymnasium")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import TensorDictModule, TensorDictSequential  # noqa: E402
from torchrl.data import Composite, OneHot, Unbounded  # noqa: E402
from torchrl.envs import Compose, EnvBase, GymEnv, InitTracker, StepCounter, TransformedEnv  # noqa: E402
from torchrl.modules import LSTMModule  # noqa: E402

from rlserve import AsyncBatchedCollector  # noqa: E402


class ArgmaxOneHot(nn.Module):
    def forward(self, logits):
        return nn.functional.one_hot(logits.argmax(-1), 2)


def mlp_policy():
    torch.manual_seed(0)
    return TensorDictModule(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2), ArgmaxOneHot()),
                            in_keys=["observation"], out_keys=["action"])


def cartpole():
    return GymEnv("CartPole-v1")


_LSTM = None


def lstm_parts():
    global _LSTM
    if _LSTM is None:
        torch.manual_seed(0)
        lstm = LSTMModule(input_size=4, hidden_size=8, in_key="observation", out_key="features")
        head = TensorDictModule(nn.Sequential(nn.Linear(8, 2), ArgmaxOneHot()), in_keys=["features"],
                                out_keys=["action"])
        _LSTM = (lstm, TensorDictSequential(lstm, head))
    return _LSTM


def lstm_env():
    lstm, _ = lstm_parts()
    return TransformedEnv(GymEnv("CartPole-v1"), Compose(InitTracker(), lstm.make_tensordict_primer()))


@pytest.mark.parametrize("backend", ["threading", "multiprocessing"])
def test_gymenv_batches_have_torchrl_layout(backend):
    c = AsyncBatchedCollector([cartpole] * 2, policy=mlp_policy(), frames_per_batch=40, total_frames=80,
                              env_backend=backend)
    batches = list(c)
    c.shutdown()
    assert [b.shape[0] for b in batches] == [40, 40]
    b = batches[0]
    keys = set(b.keys(True, True))
    for k in ("observation", "action", "done", "terminated", "truncated", "env_index", "policy_version",
              ("next", "observation"), ("next", "reward"), ("next", "done"), ("next", "terminated")):
        assert k in keys, k
    assert b["action"].shape == (40, 2) and b["next", "reward"].shape == (40, 1)
    for e in (0, 1):  # each env's steps chain: the next observation is the following step's
        sub = b[b["env_index"] == e]
        if sub.shape[0] > 1:
            done = sub["next", "done"][:-1].squeeze(-1)
            same = (sub["next", "observation"][:-1] == sub["observation"][1:]).all(-1)
            assert bool(same[~done].all())


@pytest.mark.parametrize("backend", ["threading", "multiprocessing"])
def test_lstm_policy_state_carries_over_and_resets(backend):
    _, policy = lstm_parts()
    seen = []

    def spy(td):
        seen.append(set(td.keys(True, True)))
        return policy(td)

    c = AsyncBatchedCollector([lstm_env] * 2, policy=spy if backend == "threading" else policy,
                              frames_per_batch=80, total_frames=80, env_backend=backend)
    (b,) = list(c)
    c.shutdown()
    if backend == "threading":  # the whole step TensorDict reached the policy: primer state, is_init
        assert all({"is_init", "recurrent_state_h", "recurrent_state_c", "observation"} <= s for s in seen)
    later_steps = 0
    for e in (0, 1):  # (on a loaded machine one env may bring few frames: count over both)
        sub = b[b["env_index"] == e]
        h, hn = sub["recurrent_state_h"], sub["next", "recurrent_state_h"]
        is_init = sub["is_init"].squeeze(-1)
        done = sub["next", "done"][:-1].squeeze(-1)
        carried = (hn[:-1] == h[1:]).flatten(1).all(-1)
        assert bool(carried[~done].all())  # the state the policy wrote is the next step's state
        assert bool((h[is_init] == 0).all())  # and starts afresh at each reset
        assert bool((h[~is_init].flatten(1).abs().sum(-1) > 0).all())  # a later step carries a state
        later_steps += int((~is_init).sum())
    assert later_steps >= 20, later_steps


class MaskedEnv(EnvBase):
    """A torchrl env whose observation carries an action mask (two of four actions allowed)."""

    def __init__(self):
        super().__init__()
        self.observation_spec = Composite(observation=Unbounded((3,)), action_mask=Unbounded((4,), dtype=torch.bool))
        self.action_spec = OneHot(4)
        self.reward_spec = Unbounded((1,))

    def _mask(self):
        m = torch.zeros(4, dtype=torch.bool)
        m[torch.randperm(4)[:2]] = True
        return m

    def _reset(self, td):
        return TensorDict(observation=torch.randn(3), action_mask=self._mask())

    def _step(self, td):
        allowed = bool(td["action_mask"][td["action"].argmax()])
        return TensorDict(observation=torch.randn(3), action_mask=self._mask(),
                          reward=torch.tensor([1.0 if allowed else -1.0]), done=torch.zeros(1, dtype=torch.bool))

    def _set_seed(self, seed):
        torch.manual_seed(seed)


class MaskedPolicy(nn.Module):
    def forward(self, obs, mask):
        logits = torch.zeros(mask.shape).masked_fill(~mask, -1e9)
        return nn.functional.one_hot(logits.argmax(-1), 4)


def test_action_masks_and_transformed_envs_reach_the_policy():
    policy = TensorDictModule(MaskedPolicy(), in_keys=["observation", "action_mask"], out_keys=["action"])
    with AsyncBatchedCollector([lambda: TransformedEnv(MaskedEnv(), StepCounter(max_steps=5))] * 2, policy=policy,
                               frames_per_batch=30, total_frames=30) as c:
        (b,) = list(c)
    assert bool((b["next", "reward"] == 1.0).all())  # every action respected its mask
    assert "step_count" in b.keys() and int(b["step_count"].max()) <= 5


def test_pendulum_continuous_actions():
    torch.manual_seed(0)
    policy = TensorDictModule(nn.Sequential(nn.Linear(3, 1), nn.Tanh()), in_keys=["observation"], out_keys=["action"])
    with AsyncBatchedCollector([functools.partial(GymEnv, "Pendulum-v1")] * 2, policy=policy, frames_per_batch=30,
                               total_frames=30) as c:
        (b,) = list(c)
    assert b["action"].shape == (30, 1) and b["action"].dtype == torch.float32


def test_torchrl_replay_buffer():
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    rb = ReplayBuffer(storage=LazyTensorStorage(1000))
    with AsyncBatchedCollector([cartpole] * 2, policy=mlp_policy(), frames_per_batch=32, total_frames=96,
                               replay_buffer=rb) as c:
        assert list(c) == [None, None, None]
    assert len(rb) == 96
    sample = rb.sample(8)
    assert sample["action"].shape == (8, 2) and "env_index" in sample.keys()


def test_rollout_matches_torchrl_collector_layout():
    """Same env, same policy: rlserve's batch has every key torchrl's collector yields (plus env_id)."""
    import warnings

    from torchrl.collectors import AsyncBatchedCollector as TorchRLCollector

    warnings.simplefilter("ignore", FutureWarning)
    theirs = TorchRLCollector([cartpole] * 2, policy=mlp_policy(), frames_per_batch=20, total_frames=20,
                              env_backend="threading")
    (tb,) = list(theirs)
    theirs.shutdown()
    with AsyncBatchedCollector([cartpole] * 2, policy=mlp_policy(), frames_per_batch=20, total_frames=20) as c:
        (ob,) = list(c)
    tk = {k: (tuple(v.shape), v.dtype) for k, v in tb.items(True, True)}
    ok = {k: (tuple(v.shape), v.dtype) for k, v in ob.items(True, True)}
    assert set(ok) - set(tk) == {"env_id"}  # rlserve's own alias of env_index, nothing else extra
    for k, spec in tk.items():
        assert ok[k] == spec, (k, ok[k], spec)


def test_demo_trains_on_torchrl_gymenv_briefly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlserve.cli", "demo", "--torchrl-env", "--envs", "4",
                          "--time-limit", "4", "--frames-per-batch", "256", "--no-progress", "--plot", ""],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(torchrl GymEnv)" in out.stdout and "frames/s" in out.stdout, out.stdout


def test_rlserve_imports_torchrl_only_when_handed_a_torchrl_object():
    code = ("import sys, gymnasium as gym, torch\n"
            "from tensordict.nn import TensorDictModule\n"
            "import rlserve\n"
            "from rlserve import AsyncBatchedCollector, InferenceServer, PolicyClientModule\n"
            "p = TensorDictModule(lambda o: torch.zeros(o.shape[:-1], dtype=torch.int64), ['observation'], ['action'])\n"
            "with AsyncBatchedCollector(lambda: gym.make('CartPole-v1'), p, 8, 8, num_envs=2) as c:\n"
            "    list(c)\n"
            "assert 'torchrl' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torchrl'))[:5]\n"
            "print('NO-TORCHRL')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NO-TORCHRL" in out.stdout, out.stdout + out.stderr[-2000:]
