"""ProcessServer: an InferenceServer + MPTransport running in a process of its own.

The policy is built in that process by a picklable factory, so the trainer's
process keeps its cores (and GIL) to itself. Clients are the MPTransport's
own: ``ps.client()`` works here and in any actor process.
:class:`ProcessInferenceServer` is the same thing with torchrl 0.14's
constructor and methods.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from typing import Any, Callable

import torch

from .errors import ServerClosedError, ServerDeadError
from .transport import InferenceClient, InferenceTransport
from .transports.mp import MPTransport

__all__ = ["ProcessServer", "ProcessInferenceServer"]

log = logging.getLogger("rlserve")
_CMD_TIMEOUT_S = 30.0


def _serve(factory, transport, server_kwargs, conn, parent_pid, weights) -> None:
    """Body of the server process: build the policy, serve, obey commands."""
    import torch

    from .hosted import HostedServer

    try:
        torch.set_num_threads(server_kwargs.get("num_threads") or 1)
        transport.default_spin_us = 100.0  # this process does nothing else: spinning a little is cheap
        hosted = HostedServer(factory, transport, server_kwargs, initial_weights=weights)
    except BaseException as e:
        conn.send((0, ("err", RuntimeError(repr(e)))))
        return
    conn.send((0, ("ready", os.getpid())))
    try:
        while hosted.is_alive and os.getppid() == parent_pid:
            if not conn.poll(0.2):
                continue
            seq, cmd, args = conn.recv()
            if cmd == "shutdown":
                break
            conn.send((seq, hosted.command(cmd, *args)))  # the number pairs the reply with its command
    except (EOFError, OSError):  # the owner is gone: stop serving
        pass
    finally:
        hosted.shutdown(5.0)
        try:
            conn.send((-1, ("bye", None)))
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
    ``is_alive`` and use as a context manager mirror InferenceServer. A
    stopped ProcessServer starts again (a new process, with the newest
    weights sent through ``update_weights``).
    """

    def __init__(self, policy_factory: Callable[[], Any], transport: MPTransport | None = None, *,
                 start_method: str | Any = "spawn", start_timeout: float = 120.0, **server_kwargs: Any):
        if not callable(policy_factory):
            raise TypeError("policy_factory must be a picklable callable returning the model")
        self.transport = transport if transport is not None else MPTransport()
        self._factory = policy_factory
        self._kwargs = server_kwargs
        self._ctx = mp.get_context(start_method) if isinstance(start_method, str) or start_method is None \
            else start_method
        self._timeout = start_timeout
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self._closed = False
        self._weights = None  # (private CPU copy, version) last applied: a restarted process starts from them
        self._seq = 0  # commands are numbered; a reply to one that timed out is recognised and set aside
        self._late_weights: dict = {}  # seq -> weights of an update whose reply did not come in time
        self._version = int(server_kwargs.get("policy_version", 0))
        self.pid: int | None = None

    def start(self) -> ProcessServer:
        """Start the server process (again, after a shutdown). Returns ``self``."""
        if self._proc is not None and self._proc.is_alive() and not self._closed:
            raise RuntimeError("Server is already running.")
        here, there = self._ctx.Pipe()
        self._conn, self._seq, self._late_weights = here, 0, {}
        self._closed = False
        self.transport.closed_here = False
        self._proc = self._ctx.Process(
            target=_serve, args=(self._factory, self.transport, self._kwargs, there, os.getpid(), self._weights),
            name="rlserve-process-server", daemon=True)
        self._proc.start()
        there.close()
        try:
            kind, info = self._reply(0, self._timeout)
        except TimeoutError:
            self.shutdown()
            raise TimeoutError(
                f"the server process did not report readiness within {self._timeout} s; if the policy factory "
                "loads a large checkpoint, raise the start timeout") from None
        if kind != "ready":
            self.shutdown()
            raise RuntimeError(f"the server process failed to start: {info}")
        self.pid = info
        return self

    def _reply(self, seq: int, timeout: float) -> tuple:
        """Wait for the server process's reply to command ``seq``, noticing if it dies meanwhile.
        Replies to earlier commands that timed out are set aside on the way."""
        deadline = time.monotonic() + timeout
        while True:
            if self._conn.poll(max(0.0, min(0.2, deadline - time.monotonic()))):
                try:
                    got, msg = self._conn.recv()
                except (EOFError, OSError):
                    raise ServerDeadError("the server process died") from None
                if got == seq:
                    return msg
                self._late_reply(got, msg)
                continue
            if not self._proc.is_alive():
                raise ServerDeadError(f"the server process died (exit code {self._proc.exitcode})")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the server process did not answer within {timeout} s")

    def _late_reply(self, seq: int, msg: tuple) -> None:
        """The reply to a command that timed out: weights it applied after all become the ones a
        restarted process starts from."""
        weights = self._late_weights.pop(seq, None)
        kind, val = msg
        if weights is not None and kind == "ok" and val >= self._version:
            self._weights, self._version = (weights, val), val

    def _command(self, cmd: str, *args: Any, timeout: float = _CMD_TIMEOUT_S, weights: Any = None) -> Any:
        """Run ``cmd`` in the server process; ``weights``: the private copy an update carries."""
        with self._lock:
            if self._proc is None or self._closed:
                raise ServerClosedError("the process server is not running")
            if not self._proc.is_alive():
                raise ServerDeadError(f"the server process died (exit code {self._proc.exitcode})")
            self._seq += 1
            seq = self._seq
            try:
                self._conn.send((seq, cmd, args))
            except (OSError, EOFError):
                raise ServerDeadError("the server process died") from None
            try:
                kind, val = self._reply(seq, timeout)
            except TimeoutError:
                if weights is not None:  # it may still be applied: see _late_reply
                    self._late_weights[seq] = weights
                raise
            if kind == "ok" and weights is not None:
                self._weights, self._version = (weights, val), val
        if kind == "err":
            raise val
        return val

    def client(self) -> InferenceClient:
        """A client of this server (picklable; use it here or in any actor process)."""
        return self.transport.client()

    def stats(self, *, reset: bool = False) -> dict:
        """The server's stats, plus ``"transport"``: the slot registry figures."""
        return self._command("stats", reset)

    def update_weights(self, weights: Any, version: int | None = None, *, mark_weight_update: bool = True,
                       timeout: float = _CMD_TIMEOUT_S) -> int:
        """Send weights (state dict, TensorDict of parameters, or module) to the server process; applied
        between batches. Returns the version answers will carry (see
        :meth:`InferenceServer.update_weights <rlserve.InferenceServer.update_weights>`); ValueError
        (the old weights keep serving) if they do not fit the model.

        A private CPU copy is taken first: it is what travels, and what a
        restarted process starts from (never the caller's tensors, which may
        have changed since). An update whose reply times out may still be
        applied; a later reply is recognised as such.
        """
        copy = _private_copy(weights)
        return self._command("update_weights", copy, version, mark_weight_update, timeout=timeout, weights=copy)

    @property
    def policy_version(self) -> int:
        """The version the server process stamps now (the last known one if it is not running)."""
        try:
            self._version = self._command("policy_version", timeout=5.0)
        except (ServerClosedError, TimeoutError):
            pass
        return self._version

    def health(self, *, timeout: float = 5.0) -> dict:
        """``{"process_alive", "pid", "exitcode"}`` plus, when it answers, ``"alive"`` and
        ``"policy_version"`` (or ``"control_error"``); never raises."""
        proc = self._proc
        out = {"process_alive": proc is not None and proc.is_alive(), "pid": self.pid,
               "exitcode": proc.exitcode if proc is not None else None}
        if out["process_alive"] and not self._closed:
            try:
                out.update(self._command("health", timeout=timeout))
            except Exception as e:
                out["control_error"] = repr(e)
        return out

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and not self._closed and self._proc.is_alive()

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the server process (answering what it accepted) and unlink its shared memory.

        Returns within about ``timeout`` seconds: a process that has not
        stopped by then (stuck, or stopped by a signal) is killed.
        """
        if self._proc is None or self._closed:
            return
        self._closed = True
        self.transport.closed_here = True
        timeout = 5.0 if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            if self._proc.is_alive() and self._lock.acquire(timeout=timeout):
                try:
                    self._conn.send((-1, "shutdown", ()))
                    self._reply(-1, max(0.0, deadline - time.monotonic()))  # "bye"; late replies on the way
                finally:
                    self._lock.release()
        except (OSError, EOFError, TimeoutError, ServerDeadError):
            pass
        self._proc.join(max(0.0, deadline - time.monotonic()))
        if self._proc.is_alive():
            log.warning("rlserve: server process did not stop in %s s; killing it", timeout)
            self._proc.kill()  # SIGKILL: immediate, even for a stopped process
            self._proc.join(1.0)
        self._conn.close()
        self.transport.cleanup()  # a crashed server cannot unlink its own segments

    def __enter__(self) -> ProcessServer:
        if self._proc is None or self._closed:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self):
        try:
            if self._proc is not None and not self._closed:
                self.shutdown(1.0)
        except Exception:
            pass


def _private_copy(weights: Any) -> dict:
    """A flat CPU copy of ``weights`` that nothing else writes into."""
    from .weight_sync.base import flat_weights

    return {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in flat_weights(weights).items()}


_PROCESS_OPTIONS = ("mp_context", "startup_timeout")


class ProcessInferenceServer(ProcessServer):
    """torchrl's ``ProcessInferenceServer``: the policy and its server in a process of its own.

    All arguments are keyword-only, as in torchrl 0.14. ``policy_factory``
    builds the policy in the child; ``transport`` (an MPTransport, or one of
    the slot transports) reaches it; the batching, device, weight and version
    arguments are :class:`~rlserve.InferenceServer`'s. ``mp_context``: a start
    method name or context (default ``"spawn"``); ``startup_timeout``: seconds
    to wait for the child to serve.
    """

    def __init__(self, *, policy_factory: Callable[[], Any], transport: InferenceTransport | None = None,
                 request_spec: Any = None, mp_context: Any = None, startup_timeout: float = 300.0,
                 **server_kwargs: Any):
        from .deploy import check_server_arguments

        check_server_arguments(server_kwargs)
        if "shutdown_event" in server_kwargs:
            raise TypeError("ProcessInferenceServer() got an unexpected keyword argument 'shutdown_event'")
        if request_spec is not None:
            server_kwargs["request_spec"] = request_spec
        super().__init__(policy_factory, transport, start_method=mp_context or "spawn",
                         start_timeout=startup_timeout, **server_kwargs)
        self.policy_factory = policy_factory
        self.startup_timeout = startup_timeout
        self.static_batch_size = server_kwargs.get("static_batch_size")
        self._client = None

    @classmethod
    def from_server_arguments(cls, model: Any, transport: Any, *, policy_factory: Any = None,
                              service_backend: Any = None, service_backend_options: dict | None = None,
                              transport_options: dict | None = None, request_spec: Any = None,
                              response_spec: Any = None, num_clients: int | None = None,
                              **kwargs: Any) -> ProcessInferenceServer:
        """``InferenceServer(..., service_backend="process")``: torchrl's checks, then a ProcessInferenceServer."""
        from .deploy import check_owner_arguments, make_transport, service_from_context

        tr = make_transport(transport, "process", transport_options=transport_options, request_spec=request_spec,
                            response_spec=response_spec, num_clients=num_clients,
                            service_in_context=service_from_context(service_backend, kwargs.get("server_config")))
        opts = check_owner_arguments("process", model, policy_factory, service_backend_options, _PROCESS_OPTIONS)
        return cls(policy_factory=policy_factory, transport=tr, request_spec=request_spec, **opts, **kwargs)

    @property
    def service_backend(self) -> str:
        return "process"

    @property
    def transport_kind(self) -> str:
        from .deploy import transport_kind

        return transport_kind(self.transport)

    def client(self) -> InferenceClient:
        """The same client each call (picklable: hand it to any actor process)."""
        if self._client is None:
            self._client = self.transport.client()
        return self._client

    def clients(self, num_clients: int) -> list:
        """``num_clients`` new clients."""
        from .deploy import check_num_clients

        return [self.transport.client() for _ in range(check_num_clients(num_clients))]

    def stats(self, *, reset: bool = False, timeout: float = 5.0) -> dict:
        return self._command("stats", reset, timeout=timeout)

    def update_model_weights(self, weights: Any, *, mark_weight_update: bool = True,
                             timeout: float = 300.0) -> dict:
        """Apply ``weights`` (a module, TensorDict of parameters or state dict) in the server process,
        between batches; a restarted process starts from them too."""
        self.update_weights(weights, mark_weight_update=mark_weight_update, timeout=timeout)
        return {"accepted": True}

    def prepare_cudagraph(self, request_spec: Any = None, *, interaction_type: Any = None) -> None:
        """Capture the CUDA graph in the server process at its start (needs a CUDA policy device there)."""
        if self.is_alive:
            raise RuntimeError("The process inference server must prepare its CUDA graph before start.")
        if request_spec is not None:
            self._kwargs["request_spec"] = request_spec
