"""rlserve: batched policy serving for many reinforcement-learning actors.

Every public name is importable from here. Backends with heavy or optional
dependencies (multiprocessing, Ray, Monarch, the collector) load on first use,
so ``import rlserve`` stays light and works without Ray or Monarch installed.
"""
from importlib import import_module

from .client_module import PolicyClientModule
from .config import InferenceDeviceConfig, InferenceServerConfig
from .errors import AnswerTimeout, QueueFullError, RequestError, RLServeError, ServerClosedError, ServerDeadError
from .server import InferenceServer
from .stats import format_stats
from .transport import InferenceClient, InferenceTransport, ServerHandle, TransportCapabilities
from .transports.threading import ThreadingTransport
from .weight_sync import WeightSyncScheme

__version__ = "0.1.0"

# name -> module that defines it, imported on first attribute access
_LAZY = {
    "MPTransport": ".transports.mp",
    "ProcessServer": ".process_server",
    "ProcessInferenceServer": ".process_server",
    "RayInferenceServer": ".ray_server",
    "SlotTransport": ".transports.slots",
    "SharedMemoryTransport": ".transports.slots",
    "ProcessSlotTransport": ".transports.slots",
    "RayTransport": ".transports.ray",
    "MonarchTransport": ".transports.monarch",
    "SharedMemWeightSyncScheme": ".weight_sync.shared_mem",
    "MultiProcessWeightSyncScheme": ".weight_sync.multiprocess",
    "NoWeightSyncScheme": ".weight_sync.base",
    "RayWeightSyncScheme": ".weight_sync.ray",
    "AsyncBatchedCollector": ".collector",
    "EnvError": "._env_actor",
}

__all__ = [
    "InferenceServer",
    "InferenceServerConfig",
    "InferenceDeviceConfig",
    "PolicyClientModule",
    "InferenceClient",
    "InferenceTransport",
    "TransportCapabilities",
    "ServerHandle",
    "ThreadingTransport",
    "WeightSyncScheme",
    "RLServeError",
    "ServerClosedError",
    "ServerDeadError",
    "QueueFullError",
    "RequestError",
    "AnswerTimeout",
    "format_stats",
    *_LAZY,
]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rlserve' has no attribute {name!r}")
    value = getattr(import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
