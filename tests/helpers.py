"""What the tests share: models, and the shared-memory check. Importable by spawned children."""
import os
import time

import torch
import torch.nn as nn
from tensordict.nn import TensorDictModule

# Transports made by this test session, by token: /dev/shm checks look only at their segments, so a
# run beside another (a second checkout's tests, a benchmark) cannot make them fail.
_TOKENS: set = set()


def track_transport_tokens() -> None:
    """Record the token of every MPTransport this process creates (called once, by conftest)."""
    from rlserve.transports.mp import MPTransport

    if getattr(MPTransport.__init__, "_tracked", False):
        return
    real = MPTransport.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        _TOKENS.add(self.token)

    init._tracked = True
    MPTransport.__init__ = init


def track_token(token: str) -> None:
    """Count the segments of a transport made in another process (its token) as this session's."""
    _TOKENS.add(token)


def rlserve_shm() -> set:
    """Shared-memory segments in /dev/shm of the MPTransports this session made."""
    return {f for f in os.listdir("/dev/shm")
            if f.startswith("rlserve_") and f[len("rlserve_"):].split("_", 1)[0] in _TOKENS}


def seed_policy(obs_dim: int = 8, act_dim: int = 4) -> TensorDictModule:
    """The seed documents' policy: Linear(8,64)-ReLU-Linear(64,4) on "observation" -> "action"."""
    torch.manual_seed(0)
    return TensorDictModule(
        nn.Sequential(nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, act_dim)),
        in_keys=["observation"], out_keys=["action"])


class Doubler(nn.Module):
    """action = 2 * observation: any shape, so routing and grouping are visible."""

    def forward(self, obs):
        return obs * 2


def doubler() -> TensorDictModule:
    return TensorDictModule(Doubler(), in_keys=["observation"], out_keys=["action"])


class Slow(nn.Module):
    """x * 2 after sleeping ``s`` seconds (keeps a server busy)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        time.sleep(self.s)
        return x * 2


def slow_doubler(s: float) -> TensorDictModule:
    return TensorDictModule(Slow(s), in_keys=["observation"], out_keys=["action"])


def start_local_ray(**kwargs):
    """ray.init for tests: a local instance, every Ray process listening on 127.0.0.1 only."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray 2.60: keep every server on loopback
    import ray

    opts = dict(num_cpus=2, include_dashboard=False, log_to_driver=False,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    opts.update(kwargs)
    return ray.init(**opts)
