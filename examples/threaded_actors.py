"""16 actor threads served by one batching server; prints what the server saw.

    python examples/threaded_actors.py
"""
import concurrent.futures

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from rlserve import InferenceServer, ThreadingTransport, format_stats

policy = TensorDictModule(
    nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)),
    in_keys=["observation"],
    out_keys=["action"],
)


def actor(client, steps=200):
    total = 0.0
    for _ in range(steps):
        answer = client(TensorDict(observation=torch.randn(8)))
        total += answer["action"].sum().item()
    return total


transport = ThreadingTransport()
with InferenceServer(policy, transport, max_batch_size=32) as server:
    client = transport.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(actor, [client] * 16))
    print(format_stats(server.stats()))
