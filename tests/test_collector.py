"""AsyncBatchedCollector: real gymnasium envs, plain envs, errors, server death, weight updates."""
import sys
import threading
import time

import gymnasium as gym
import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from helpers import QueueScheme
from rlserve import AsyncBatchedCollector, ServerDeadError, WeightSyncScheme
from rlserve import EnvError


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
    assert not any(t.is_alive() for t in c._threads)  # white-box on purpose: the actor threads themselves stopped


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


def test_env_factories_never_run_concurrently():
    """Env construction is often not thread-safe (torchrl's GymEnv races on lazy imports when
    many threads build one at once): the collector's actor threads build their envs one at a time."""
    inside, most = [0], [0]
    lock = threading.Lock()

    def make():
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)  # wide window: concurrent builders would overlap here
        with lock:
            inside[0] -= 1
        return CounterEnv()

    with AsyncBatchedCollector([make] * 8, bias_policy(), 40, 40) as c:
        frames = sum(b.numel() for b in c)
    assert frames == 40
    assert most[0] == 1


def test_a_hanging_env_factory_holds_no_other_actor_after_shutdown():
    """Factories take turns; one that hangs must not keep the actors waiting for their turn
    alive after shutdown (they notice the stop within a liveness period)."""
    release = threading.Event()
    first = threading.Lock()

    def make():
        if first.acquire(blocking=False):  # the first factory to run hangs until released
            release.wait(30)
        return CounterEnv()

    c = AsyncBatchedCollector([make] * 3, bias_policy(), 10, -1).start()
    try:
        time.sleep(0.3)  # one actor inside the hung factory, two waiting for their turn
        c.shutdown(timeout=1.0)
        threads = c._threads  # white-box on purpose: which actor threads are still alive
        deadline = time.monotonic() + 2.0
        while sum(t.is_alive() for t in threads) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(t.is_alive() for t in threads) == 1  # only the one inside the hung factory
        # the turn is this collector's: another collector builds its envs meanwhile
        with AsyncBatchedCollector([CounterEnv] * 2, bias_policy(), 10, 10) as other:
            assert other.next_batch(timeout=5).numel() == 10
    finally:
        release.set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)


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


def test_update_policy_weights_through_a_torchrl_protocol_scheme():
    """Found in review: the collector called ``send(model=...)``; torchrl's schemes take ``send(weights=)``."""
    trainer = bias_policy()
    with AsyncBatchedCollector(lambda: CounterEnv(1000), bias_policy(), 32, -1, num_envs=2,
                               weight_sync=QueueScheme(), max_buffered_frames=32) as c:
        it = iter(c)
        assert (next(it)["action"] == 0).all()
        for value, weights in ((3.0, "module"), (5.0, "tensordict")):
            with torch.no_grad():
                trainer.module.bias.fill_(value)
            sent = trainer if weights == "module" else TensorDict.from_module(trainer).data.clone()
            c.update_policy_weights_(sent)
            deadline = time.monotonic() + 20
            while not (next(it)["action"] == value).any():
                assert time.monotonic() < deadline, f"the {weights}'s weights never reached the policy"


@pytest.mark.timeout(120)
def test_two_iterators_share_one_stream_without_losing_frames():
    """Found in review: two consumers raced in taking transitions (IndexError, frames lost) and in
    starting the collector (a spurious ServerDeadError)."""
    total, errors, got = 4000, [], [0, 0]
    c = AsyncBatchedCollector(lambda: CounterEnv(7), bias_policy(), 8, total, num_envs=4)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows within the run

    def consume(k):
        try:
            for td in c:  # both iterate from the start: the first iteration starts the collector
                got[k] += td.numel()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=consume, args=(k,), daemon=True) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not any(t.is_alive() for t in threads), "an iterator hung"
    finally:
        sys.setswitchinterval(switch)
        c.shutdown()
    assert errors == []
    assert sum(got) == total == c.frames  # every frame handed out once, none beyond total_frames


def test_backpressure_bounds_buffer():
    with AsyncBatchedCollector(lambda: CounterEnv(1000), bias_policy(), 16, -1, num_envs=4,
                               max_buffered_frames=32) as c:
        next(iter(c))
        time.sleep(0.5)  # nobody reads: the actors must pause
        buffered = len(c._sink.buf)  # white-box on purpose: the bound on buffered transitions
    assert 16 <= buffered <= 32 + 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="frames_per_batch"):
        AsyncBatchedCollector(lambda: CounterEnv(), bias_policy(), 0)
    with pytest.raises(TypeError, match="create_env_fn"):
        AsyncBatchedCollector("CartPole-v1", bias_policy(), 10)
    with pytest.raises(ValueError, match="num_envs"):
        AsyncBatchedCollector([CounterEnv, CounterEnv], bias_policy(), 10, num_envs=3)


# -- torchrl's constructor and behaviours, on gymnasium envs -------------------------------------
def make_cartpole():
    return gym.make("CartPole-v1")


def test_torchrl_constructor_form_and_batch_keys():
    """torchrl's form: a list of factories, policy=, frames_per_batch=, env_backend=; env_index per row."""
    c = AsyncBatchedCollector([make_cartpole] * 2, policy=cartpole_policy(), frames_per_batch=32, total_frames=70,
                              env_backend="threading", max_batch_size=2, server_timeout=0.01)
    sizes = [b.shape[0] for b in c]
    c.shutdown()
    c.shutdown()  # idempotent
    assert sizes == [32, 32, 6]  # the last batch is cut to total_frames, as torchrl does
    assert len(c) == 3
    with pytest.raises(TypeError, match="mutually exclusive"):
        AsyncBatchedCollector([make_cartpole], policy=cartpole_policy(), policy_factory=cartpole_policy,
                              frames_per_batch=8)
    with pytest.raises(TypeError, match="One of policy or policy_factory"):
        AsyncBatchedCollector([make_cartpole], frames_per_batch=8)
    with pytest.raises(ValueError, match="env_backend='ray' is not supported"):
        AsyncBatchedCollector([make_cartpole], policy=cartpole_policy(), frames_per_batch=8, env_backend="ray")
    with pytest.raises(ValueError, match="frames_per_batch must be a positive integer"):
        AsyncBatchedCollector([make_cartpole], policy=cartpole_policy(), frames_per_batch=0)


def test_env_index_postproc_hook_and_order():
    seen = []

    def postproc(td):
        seen.append(("postproc", td.shape[0]))
        td["postprocessed"] = torch.ones(td.shape[0])
        return td

    def hook(td):
        seen.append(("hook", "postprocessed" in td.keys()))

    with AsyncBatchedCollector([make_cartpole] * 3, policy_factory=cartpole_policy, frames_per_batch=30,
                               total_frames=60, postproc=postproc, post_collect_hook=hook) as c:
        batches = list(c)
    assert seen == [("postproc", 30), ("hook", True)] * 2
    b = batches[0]
    assert torch.equal(b["env_index"], b["env_id"]) and set(b["env_index"].tolist()) <= {0, 1, 2}
    assert b["env_index"].shape == (30,) and b["policy_version"].shape == (30,)


def test_yield_completed_trajectories():
    with AsyncBatchedCollector([make_cartpole] * 2, policy=cartpole_policy(), frames_per_batch=10,
                               total_frames=100, yield_completed_trajectories=True, seed=0) as c:
        trajs = list(c)
    assert sum(t.shape[0] for t in trajs) >= 100
    for t in trajs:
        done = t["next", "done"].squeeze(-1)
        assert bool(done[-1]) and not bool(done[:-1].any())  # exactly one episode, ending with its done
        assert len(set(t["env_index"].tolist())) == 1
        nxt, cur = t["next", "observation"][:-1], t["observation"][1:]
        assert torch.equal(nxt, cur)  # consecutive steps of one env, in order


class ListBuffer:
    """A buffer with torchrl ReplayBuffer's ``extend`` (the torchrl one is tested where torchrl is installed)."""

    def __init__(self):
        self.batches = []

    def extend(self, td):
        self.batches.append(td)


def test_replay_buffer_receives_batches_and_iteration_yields_none():
    rb = ListBuffer()
    with AsyncBatchedCollector([make_cartpole] * 2, policy=cartpole_policy(), frames_per_batch=16,
                               total_frames=48, replay_buffer=rb) as c:
        out = list(c)
    assert out == [None, None, None]
    assert [b.shape[0] for b in rb.batches] == [16, 16, 16]


class DictObsEnv(gym.Env):
    """A gymnasium env with a Dict observation space and a continuous (Box) action."""

    def __init__(self):
        self.observation_space = gym.spaces.Dict({
            "pos": gym.spaces.Box(-10, 10, (2,), dtype=float),
            "vel": gym.spaces.Box(-10, 10, (2,), dtype=float),
        })
        self.action_space = gym.spaces.Box(-1, 1, (2,), dtype=float)
        self.t = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return {"pos": self.np_random.normal(size=2), "vel": self.np_random.normal(size=2)}, {}

    def step(self, action):
        assert self.action_space.contains(action.astype(float)), action
        self.t += 1
        obs = {"pos": self.np_random.normal(size=2), "vel": self.np_random.normal(size=2)}
        return obs, float(action.sum()), False, self.t >= 5, {}


class DictPolicy(nn.Module):
    def forward(self, pos, vel):
        return torch.tanh(pos + vel).to(torch.float64)


def test_dict_observations_and_continuous_actions():
    policy = TensorDictModule(DictPolicy(), in_keys=[("observation", "pos"), ("observation", "vel")],
                              out_keys=["action"])
    with AsyncBatchedCollector(DictObsEnv, policy=policy, frames_per_batch=20, total_frames=20, num_envs=2) as c:
        (b,) = list(c)
    assert b["observation", "pos"].shape == (20, 2) and b["next", "observation", "vel"].shape == (20, 2)
    assert b["action"].shape == (20, 2)
    assert torch.allclose(b["next", "reward"].squeeze(-1).double(), b["action"].sum(-1), atol=1e-5)


def test_pendulum_with_a_linear_policy():
    torch.manual_seed(0)
    policy = TensorDictModule(nn.Linear(3, 1), in_keys=["observation"], out_keys=["action"])
    with AsyncBatchedCollector(lambda: gym.make("Pendulum-v1"), policy=policy, frames_per_batch=40,
                               total_frames=40, num_envs=2) as c:
        (b,) = list(c)
    assert b["action"].shape == (40, 1) and b["observation"].shape == (40, 3)


def test_exploration_type_reaches_the_policy():
    from tensordict.nn.probabilistic import interaction_type

    seen = set()

    def policy(td):
        seen.add(str(interaction_type()))
        td["action"] = torch.zeros(td.shape[0], dtype=torch.int64)
        return td

    for mode, want in ((None, "random"), ("deterministic", "deterministic")):
        seen.clear()
        kw = {} if mode is None else {"exploration_type": mode}
        with AsyncBatchedCollector(make_cartpole, policy=policy, frames_per_batch=8, total_frames=8, **kw) as c:
            list(c)
        assert seen == {want}, (mode, seen)  # torchrl's default exploration type is "random"


def test_seed_state_dict_and_restart_after_shutdown():
    c = AsyncBatchedCollector(make_cartpole, policy=cartpole_policy(), frames_per_batch=10, total_frames=30,
                              num_envs=2)
    assert c.set_seed(7) == 7
    it = iter(c)
    first = next(it)
    first_obs = first["observation"][first["env_index"] == 0][0]
    want = torch.as_tensor(gym.make("CartPole-v1").reset(seed=7)[0])
    assert torch.allclose(first_obs, want)  # env 0 reset with seed + 0
    c.shutdown()
    assert c.state_dict()["frames"] == 10
    rest = list(c)  # iterating again after shutdown starts afresh, counting on
    c.shutdown()
    assert [b.shape[0] for b in rest] == [10, 10]
    d = AsyncBatchedCollector(make_cartpole, policy=cartpole_policy(), frames_per_batch=10, total_frames=30)
    d.load_state_dict(c.state_dict())
    assert d.frames == 30 and list(d) == []


def test_env_actions_as_the_env_expects_them():
    """Unit test of the collector's action conversion (internal on purpose): tensors become Python
    scalars or numpy arrays, TensorDicts dicts, non-tensor data passes through unchanged."""
    import numpy as np
    from tensordict import NonTensorData

    from rlserve._env_actor import to_env_action

    assert to_env_action(torch.tensor(3)) == 3 and type(to_env_action(torch.tensor(3))) is int
    w = torch.ones(2, requires_grad=True) * 2
    assert isinstance(to_env_action(w), np.ndarray) and to_env_action(w).tolist() == [2.0, 2.0]
    td = TensorDict(a=torch.tensor(1), nested=TensorDict(b=torch.zeros(2)), s=NonTensorData("left"))
    out = to_env_action(td)
    assert out["a"] == 1 and out["nested"]["b"].tolist() == [0.0, 0.0] and out["s"] == "left"
    assert to_env_action("left") == "left" and to_env_action(np.int64(2)) == 2
