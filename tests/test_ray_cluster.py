"""RayTransport across two Ray nodes on this machine (ray.cluster_utils.Cluster)."""
import os
import sys

import pytest
import torch
from tensordict import TensorDict

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from rlserve import RayTransport  # noqa: E402
from helpers import assert_loopback_only, seed_policy, start_local_ray  # noqa: E402

import helpers  # noqa: E402

# Ray workers cannot import the test modules: ship their functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(helpers)


@ray.remote(num_cpus=0)
class NodeCaller:
    def __init__(self, client):
        self.client = client

    def call(self, v):
        out = self.client(TensorDict(observation=torch.full((8,), float(v))), timeout=60)
        return ray.get_runtime_context().get_node_id(), out["action"].tolist()


def test_actors_on_two_nodes_share_one_server():
    shared = ray.is_initialized()  # the session's local instance: back afterwards
    if shared:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    cluster.add_node(num_cpus=1, resources={"worker": 1})
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        tr = RayTransport(seed_policy, actor_options={"resources": {"head": 0.1}})
        try:
            client = tr.client()
            callers = [NodeCaller.options(resources={r: 0.1}).remote(client) for r in ("head", "worker")]
            outs = ray.get([c.call.remote(1.0) for c in callers], timeout=120)
            assert len({node for node, _ in outs}) == 2  # really two nodes
            want = seed_policy()(TensorDict(observation=torch.ones(8)))["action"]
            for _, action in outs:
                assert torch.allclose(torch.tensor(action), want, atol=1e-6)
            assert tr.stats()["requests"] == 2
            assert_loopback_only(within_pid=os.getpid())  # both nodes, every Ray process: 127.0.0.1 only
        finally:
            tr.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if shared:
            start_local_ray()
