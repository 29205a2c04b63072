"""Helpers for the tests that start processes; importable by spawned children."""
import os
import time

import torch.nn as nn


def rlserve_shm() -> set:
    """rlserve's shared-memory segments currently in /dev/shm."""
    return {f for f in os.listdir("/dev/shm") if f.startswith("rlserve_")}


class Slow(nn.Module):
    """x * 2 after sleeping ``s`` seconds (keeps a server busy)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        time.sleep(self.s)
        return x * 2
