"""ProcessServer: an InferenceServer + MPTransport running in a process of its own.

The policy is built in that process by a picklable factory, so the trainer's
process keeps its cores (and GIL) to itself. Clients are the MPTransport's
own: ``ps.client()`` works here and in any actor process.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time

from .errors import ServerClosedError, ServerDeadError
from .transports.mp import MPTransport

__all__ = ["ProcessServer"]

log = logging.getLogger("rlserve")
_CMD_TIMEOUT_S = 30.0


def _serve(factory, transport, server_kwargs, conn, parent_pid) -> None:
    """Body of the server process: build the policy, serve, obey commands."""
    import torch

    from .hosted import HostedServer

    try:
        torch.set_num_threads(server_kwargs.get("num_threads") or 1)
        transport.default_spin_us = 100.0  # this process does nothing else: spinning a little is cheap
        hosted = HostedServer(factory, transport, server_kwargs)
    except BaseException as e:
        conn.send(("err", RuntimeError(repr(e))))
        return
    conn.send(("ready", os.getpid()))
    try:
        while hosted.is_alive and os.getppid() == parent_pid:
            if not conn.poll(0.2):
                continue
            cmd, args = conn.recv()
            if cmd == "shutdown":
                break
            conn.send(hosted.command(cmd, *args))
    except (EOFError, OSError):  # the owner is gone: stop serving
        pass
    finally:
        hosted.shutdown(5.0)
        try:
            conn.send(("bye", None))
        except (OSError, EOFError):
            pass


class ProcessServer:
    """Run the policy and its InferenceServer in a separate process.

    Args:
        policy_factory: picklable zero-argument callable returning the model
            (called in the server process).
        transport: an :class:`~rlserve.MPTransport` (default: a new one).
        start_method: ``"spawn"`` (default), ``"forkserver"`` or ``"fork"``.
        start_timeout: seconds to wait for the process to be serving.
        **server_kwargs: passed to :class:`~rlserve.InferenceServer`
            (``max_batch_size``, ``timeout``, ``weight_sync``, ...).

    ``client()``, ``stats()``, ``update_weights()``, ``shutdown()``,
    ``is_alive`` and use as a context manager mirror InferenceServer.
    """

    def __init__(self, policy_factory, transport: MPTransport | None = None, *, start_method: str = "spawn",
                 start_timeout: float = 120.0, **server_kwargs):
        if not callable(policy_factory):
            raise TypeError("policy_factory must be a picklable callable returning the model")
        self.transport = transport if transport is not None else MPTransport()
        self._factory = policy_factory
        self._kwargs = server_kwargs
        self._ctx = mp.get_context(start_method)
        self._timeout = start_timeout
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "ProcessServer":
        if self._proc is not None:
            raise RuntimeError("a ProcessServer can be started once; create a new one")
        here, there = self._ctx.Pipe()
        self._conn = here
        self._proc = self._ctx.Process(
            target=_serve, args=(self._factory, self.transport, self._kwargs, there, os.getpid()),
            name="rlserve-process-server", daemon=True)
        self._proc.start()
        there.close()
        kind, info = self._reply(self._timeout)
        if kind != "ready":
            self.shutdown()
            raise RuntimeError(f"the server process failed to start: {info}")
        self.pid = info
        return self

    def _reply(self, timeout: float):
        """Wait for the server process's answer, noticing if it dies meanwhile."""
        waited = 0.0
        while not self._conn.poll(0.2):
            waited += 0.2
            if not self._proc.is_alive():
                raise ServerDeadError(f"the server process died (exit code {self._proc.exitcode})")
            if waited >= timeout:
                raise TimeoutError(f"the server process did not answer within {timeout} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise ServerDeadError("the server process died") from None

    def _command(self, cmd: str, *args):
        with self._lock:
            if self._proc is None or self._closed:
                raise ServerClosedError("the process server is not running")
            if not self._proc.is_alive():
                raise ServerDeadError(f"the server process died (exit code {self._proc.exitcode})")
            try:
                self._conn.send((cmd, args))
            except (OSError, EOFError):
                raise ServerDeadError("the server process died") from None
            kind, val = self._reply(_CMD_TIMEOUT_S)
        if kind == "err":
            raise val
        return val

    def client(self):
        """A client of this server (picklable; use it here or in any actor process)."""
        return self.transport.client()

    def stats(self) -> dict:
        """The server's stats, plus ``"transport"``: the slot registry figures."""
        return self._command("stats")

    def update_weights(self, weights, version: int | None = None) -> int:
        """Send a state dict to the server process; applied between batches. Returns the version
        answers will carry; ValueError (the old weights keep serving) if they do not fit the model."""
        return self._command("update_weights", weights, version)

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and not self._closed and self._proc.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the server process (answering what it accepted) and unlink its shared memory.

        Returns within about ``timeout`` seconds: a process that has not
        stopped by then (stuck, or stopped by a signal) is killed.
        """
        if self._proc is None or self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            if self._proc.is_alive() and self._lock.acquire(timeout=timeout):
                try:
                    self._conn.send(("shutdown", ()))
                    self._conn.poll(max(0.0, deadline - time.monotonic()))
                finally:
                    self._lock.release()
        except (OSError, EOFError):
            pass
        self._proc.join(max(0.0, deadline - time.monotonic()))
        if self._proc.is_alive():
            log.warning("rlserve: server process did not stop in %s s; killing it", timeout)
            self._proc.kill()  # SIGKILL: immediate, even for a stopped process
            self._proc.join(1.0)
        self._conn.close()
        self.transport.cleanup()  # a crashed server cannot unlink its own segments

    def __enter__(self) -> "ProcessServer":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            if self._proc is not None and not self._closed:
                self.shutdown(1.0)
        except Exception:
            pass
