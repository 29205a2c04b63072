"""Pieces the Ray and Monarch tests share: models that tell which thread ran them, hostile payloads.

Ray workers get this module by value (test_ray registers it); Monarch children
import it by name (test_monarch puts this directory on PYTHONPATH).
"""
import pickle
import struct
import sys
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from rlserve.transports._codec import MAGIC


class ThreadProbe(nn.Module):
    """Answers 1.0 when the forward runs on the server thread, 0.0 on any other; sleeps ``delay`` s first."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay

    def forward(self, obs):
        if self.delay:
            time.sleep(self.delay)
        return torch.full(obs.shape[:1], float(threading.current_thread().name == "rlserve-server"))


def thread_probe():
    return TensorDictModule(ThreadProbe(), in_keys=["observation"], out_keys=["on_server"])


def slow_thread_probe():
    return TensorDictModule(ThreadProbe(0.005), in_keys=["observation"], out_keys=["on_server"])


def check_idle_batches_run_on_the_calling_thread(transport_cls) -> None:
    """One call at a time: the server is idle at each, so the thread that received the call
    runs the batch (no hand-over to the server thread and back). A call landing while the
    server thread happens to be awake is served there, hence "most", not "all"."""
    for run_in_caller in (True, False):
        with transport_cls(thread_probe, server_kwargs={"run_in_caller": run_in_caller}) as tr:
            client = tr.client()
            on_server = [float(client(TensorDict(observation=torch.ones(8)), timeout=30)["on_server"])
                         for _ in range(10)]
        if run_in_caller:
            assert on_server.count(0.0) >= 8, on_server
        else:
            assert on_server == [1.0] * 10


def wire_frame(header_obj, data: bytes = b"") -> bytes:
    """A wire message with any header object and data (for malformed-payload tests)."""
    h = pickle.dumps(header_obj)
    return MAGIC + struct.pack("<I", len(h)) + h + data


class _ExitOnUnpickle:
    def __reduce__(self):
        return (sys.exit, ("a hostile header",))


def exit_payload() -> bytes:
    """A wire message whose header raises SystemExit when the server unpickles it."""
    return wire_frame(_ExitOnUnpickle())
