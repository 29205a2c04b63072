"""A model whose answer reveals which weights produced it (for the weight-sync tests).

Every parameter and buffer of weight set k is filled with k. The forward reads
the minimum of all of them, does some work, then reads the maximum: an answer
with min == max == policy_version was produced by exactly one, correctly
stamped weight set; a copy overlapping the forward shows as min != max.
"""
import torch
import torch.nn as nn
from tensordict.nn import TensorDictModule


class Probe(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.register_buffer("stat", torch.zeros(width))

    def forward(self, obs):
        ts = [self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias, self.stat]
        lo = torch.stack([t.min() for t in ts]).min()
        h = obs
        for _ in range(4):  # some work between the two reads, so a torn copy has room to show
            h = torch.tanh(self.l2(torch.tanh(self.l1(h)))) * 1e-3
        hi = torch.stack([t.max() for t in ts]).max()
        n = obs.shape[0]
        return torch.stack([lo.expand(n), hi.expand(n)], -1) + 0 * h[:, :1]


def probe_module(width: int = 64) -> TensorDictModule:
    m = TensorDictModule(Probe(width), in_keys=["observation"], out_keys=["probe"])
    fill_(m, 0)
    return m


@torch.no_grad()
def fill_(model, k: float) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        t.fill_(k)


def check_answer(out) -> tuple[int, bool]:
    """(version, consistent) of one answer."""
    lo, hi = out["probe"].tolist()
    v = int(out["policy_version"])
    return v, (lo == hi == float(v))
