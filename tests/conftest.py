import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Before Ray is imported anywhere (Ray reads it once, at import): every Ray process of the test
# session listens on 127.0.0.1 only (Ray 2.60), Ray's own servers and ray.cluster_utils.Cluster included.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

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


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance on loopback, shared by every test that needs one."""
    ray = pytest.importorskip("ray")
    import helpers
    from helpers import start_local_ray

    # Ray workers cannot import the tests' modules: the shared policies travel by value
    ray.cloudpickle.register_pickle_by_value(helpers)
    if not ray.is_initialized():
        start_local_ray()
    yield ray
    if ray.is_initialized():
        ray.shutdown()
