import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.nn as nn
from mp_helpers import rlserve_shm
from tensordict.nn import TensorDictModule


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return TensorDictModule(
        nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)),
        in_keys=["observation"],
        out_keys=["action"],
    )


class Doubler(nn.Module):
    """action = 2 * observation: any shape, so routing and grouping are visible."""

    def forward(self, obs):
        return obs * 2


@pytest.fixture
def doubler():
    return TensorDictModule(Doubler(), in_keys=["observation"], out_keys=["action"])


@pytest.fixture(autouse=True, scope="module")
def no_shm_leftovers():
    """Every test module leaves /dev/shm as it found it (shared memory is always cleaned up)."""
    before = rlserve_shm()
    yield
    time.sleep(0.2)
    assert rlserve_shm() - before == set(), "rlserve shared-memory segments left in /dev/shm"
