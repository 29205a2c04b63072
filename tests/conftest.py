import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from helpers import doubler as make_doubler
from helpers import rlserve_shm, seed_policy, track_transport_tokens

track_transport_tokens()


@pytest.fixture
def policy():
    return seed_policy()


@pytest.fixture
def doubler():
    return make_doubler()


@pytest.fixture(autouse=True, scope="module")
def no_shm_leftovers():
    """Every test module leaves /dev/shm as it found it (shared memory is always cleaned up)."""
    before = rlserve_shm()
    yield
    time.sleep(0.2)
    assert rlserve_shm() - before == set(), "rlserve shared-memory segments left in /dev/shm"


_RAY_STARTED = []


@pytest.fixture
def ray_local(request):
    """A local Ray instance on loopback, started once and shared by the tests that need one."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from helpers import start_local_ray

        start_local_ray()
        if not _RAY_STARTED:
            _RAY_STARTED.append(True)
            request.session.addfinalizer(lambda: ray.shutdown() if ray.is_initialized() else None)
    return ray
