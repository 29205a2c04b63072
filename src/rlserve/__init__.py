"""rlserve: batched policy serving for many reinforcement-learning actors."""
from .errors import QueueFullError, RequestError, RLServeError, ServerClosedError, ServerDeadError
from .server import InferenceServer
from .stats import format_stats
from .transport import InferenceClient, InferenceTransport
from .transports.threading import ThreadingTransport
from .weight_sync import WeightSyncScheme

__version__ = "0.1.0"

__all__ = [
    "InferenceServer",
    "InferenceClient",
    "InferenceTransport",
    "ThreadingTransport",
    "WeightSyncScheme",
    "RLServeError",
    "ServerClosedError",
    "ServerDeadError",
    "QueueFullError",
    "RequestError",
    "format_stats",
]
