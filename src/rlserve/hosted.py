"""HostedServer: an InferenceServer built by a policy factory where it serves.

The one shell behind every server that runs away from its owner:
:class:`~rlserve.ProcessServer`'s process, and the Ray and Monarch server
actors. The owner sends commands (stats, weights, shutdown); each gets a
reply that never raises across the process boundary.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from .errors import picklable_exception
from .server import InferenceServer
from .transport import InferenceTransport

__all__ = ["HostedServer"]


class HostedServer:
    """Build the policy with ``policy_factory()`` here and serve it on ``transport``.

    Args:
        policy_factory: zero-argument callable returning the model.
        transport: the transport clients reach this process through.
        server_kwargs: keyword arguments of :class:`~rlserve.InferenceServer`.
    """

    COMMANDS = ("stats", "update_weights", "shutdown", "pid", "ping", "policy_version", "health")

    def __init__(self, policy_factory: Callable[[], Any], transport: InferenceTransport, server_kwargs: dict,
                 initial_weights: tuple | None = None):
        self.transport = transport
        self.server = InferenceServer(policy_factory(), transport, **server_kwargs)
        if initial_weights is not None:  # a restarted owner: the newest weights it sent, with their version
            self.server.update_weights(*initial_weights)
        self.server.start()

    @property
    def is_alive(self) -> bool:
        return self.server.is_alive

    def stats(self, reset: bool = False) -> dict:
        """The server's stats, plus ``"transport"``: the transport's own figures, if it has any."""
        s = self.server.stats(reset=reset)
        usage = self.transport.usage()
        if usage:
            s["transport"] = usage
        return s

    def update_weights(self, weights: Any, version: int | None = None, mark_weight_update: bool = True) -> int:
        return self.server.update_weights(weights, version, mark_weight_update=mark_weight_update)

    def shutdown(self, timeout: float | None = 5.0) -> None:
        self.server.shutdown(timeout)

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> bool:
        return True

    def policy_version(self) -> int:
        return self.server.policy_version

    def health(self) -> dict:
        return {"alive": self.server.is_alive, "policy_version": self.server.policy_version}

    def command(self, name: str, *args: Any) -> tuple[str, Any]:
        """Run one owner command: ``("ok", value)``, or ``("err", exception)`` if it raised."""
        if name not in self.COMMANDS:
            return ("err", ValueError(f"unknown command {name!r}"))
        try:
            return ("ok", getattr(self, name)(*args))
        except Exception as e:
            return ("err", picklable_exception(e))
