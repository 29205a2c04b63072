"""InferenceServer: gather pending requests, run one forward, route rows back.

The server owns its lifecycle, the serving loop (below, on one screen), the
weights, and the serve lock held around every batch and weight update. The
work of one batch is :class:`~rlserve.runner.BatchRunner`'s; how requests
travel is the transport's, reached only through the contract in
:mod:`rlserve.transport` (the transport gets a :class:`~rlserve.transport.ServerHandle`).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Callable

import torch

from . import _context
from ._server_api import ServerAPI
from ._td import TensorDictBase
from .batching import BatchPolicy
from .config import InferenceDeviceConfig, InferenceServerConfig, resolve_batching, resolve_devices
from .deploy import make_transport, resolve_service_backend, service_from_context
from .errors import ServerClosedError, ServerDeadError
from .runner import BatchRunner
from .stats import NoStats, ServerStats
from .transport import InferenceClient, InferenceTransport
from .weight_sync.foreign import as_receiver

__all__ = ["InferenceServer"]

log = logging.getLogger("rlserve")
_perf = time.perf_counter
_IDLE_WAIT_S = 0.05  # how long an idle loop sleeps before re-checking for shutdown
_FAIL_QUEUED_ROUNDS = 1000  # bound on drains at exit: a misbehaving transport cannot keep us there
_LIVE: "weakref.WeakSet[InferenceServer]" = weakref.WeakSet()

# A caller's thread-local torch state that would leak into a forward run on its thread.
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", torch.is_autocast_enabled)
_modes_on = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)  # torch.device(...), set_default_device
_dispatch_modes_on = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _after_fork_in_child() -> None:
    # The serving thread does not exist in a fork child: its copies of our servers must refuse
    # calls at once instead of queueing requests nobody will drain (or running them on a copy).
    for server in list(_LIVE):
        server._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class InferenceServer(ServerAPI):
    """Serve ``model`` to many actors through ``transport``, batching their requests.

    The constructor takes torchrl 0.14's arguments as well as rlserve's own
    (``num_threads``, ``run_in_caller``, ``name``); with
    ``service_backend="process"`` or ``"ray"`` it returns a
    :class:`~rlserve.ProcessInferenceServer` or a
    :class:`~rlserve.RayInferenceServer` that owns the policy elsewhere.

    Args:
        model: any callable from a batched TensorDict to a batched TensorDict
            (typically a ``TensorDictModule``). It runs under ``torch.no_grad``
            on the server thread (or, see ``run_in_caller``, on a blocked caller's).
        transport: an :class:`~rlserve.InferenceTransport` (or any object with
            its five methods ``submit/drain/wait_for_work/resolve/resolve_exception``),
            or a selector: ``"auto"`` (the default, also when ``None``),
            ``"thread"``/``"queue"`` (a :class:`~rlserve.ThreadingTransport`),
            ``"direct"`` (a :class:`~rlserve.SlotTransport` of ``num_clients``
            slots); with ``service_backend="process"`` also ``"process"``,
            ``"shared_memory"``, ``"process_slot"``, ``"distributed"`` (served by
            rlserve's shared-memory MPTransport); with ``"ray"``, ``"ray"`` and
            ``"distributed"`` (a :class:`~rlserve.RayTransport`).

    Keyword Args:
        policy_factory: zero-argument callable building the model, instead of
            ``model`` (required with ``service_backend="process"`` or ``"ray"``).
        service_backend: ``"thread"`` (default), ``"process"``, ``"ray"``.
        service_backend_options: ``{"mp_context", "startup_timeout"}`` for
            processes; ``{"ray_init_config", "remote_config"}`` for Ray.
        transport_options: keyword arguments of the transport a selector builds.
        request_spec, response_spec: one request / answer row, for slot
            transports (and the CUDA-graph capture of ``static_batch_size``).
        num_clients: slots of ``"direct"``, ``"shared_memory"``, ``"process_slot"``.
        max_batch_size: most requests per forward pass (default 64).
        static_batch_size: pad every batch to this many rows (the padding is
            discarded from the answers); with a CUDA ``policy_device``,
            :meth:`prepare_cudagraph` captures the model as a CUDA graph.
        min_batch_size: run a batch once this many requests are pending...
        timeout: ...or once the oldest pending request has waited this many
            seconds since it arrived (default 0.01). With ``min_batch_size=1``
            (default) the server runs whatever is pending at once; batches
            grow while the model is busy.
        collate_fn: ``list[TensorDict] -> TensorDict`` replacing the built-in
            stacking (it receives copies, so it cannot alias requests).
        device, policy_device: move the model there at construction and each
            batch before the forward (``policy_device`` wins).
        output_device: move answers here (``None``: back to the device the
            requests came from when a policy device is set, else leave them).
        collect_stats, stats_window_size: record figures for :meth:`stats`
            (default True), over windows of this many samples (default 1024).
        weight_sync: a :class:`~rlserve.WeightSyncScheme`, or a scheme following
            torchrl's receiver protocol (``torchrl.weight_update``'s included);
            the server applies new weights between batches, never during one.
        weight_sync_model_id: the model id given to a torchrl-protocol scheme.
        server_config, device_config: :class:`~rlserve.InferenceServerConfig`,
            :class:`~rlserve.InferenceDeviceConfig` instead of the loose arguments.
        shutdown_event: a ``threading.Event`` (or multiprocessing one) that stops
            the server when set.
        policy_version: the version of the initial weights.
        policy_version_key: key (nested keys allowed) of the int64 version
            stamped on every answer; ``None`` disables the stamp.
        interaction_type: the interaction type (``"random"``, ``"mode"``, ...)
            of requests whose caller had none; ``None``: none either (each
            probabilistic module's default). A caller's own always wins.
        num_threads: ``torch.set_num_threads`` on the serving thread (a
            per-thread setting: the caller's threads keep theirs). Intra-op
            threads spinning against actor threads make a small machine
            collapse, hence 1; ``None`` leaves the thread's default.
        run_in_caller: when the server is idle and an actor thread makes a
            blocking ``client(td)`` call with no timeout, that thread runs the
            batch itself instead of waking the server and then being woken:
            no thread hand-over, about 3x lower latency for a lone actor
            (``min_batch_size=1`` only; ThreadingTransport, and the request
            threads of Ray and Monarch server actors). With ``num_threads``
            above 1, each thread that runs a batch keeps its own OpenMP team.
            Batches still never overlap, and weights still change only
            between batches. Set ``False`` if the model must only ever run on
            the server thread (thread-local state such as CUDA graphs, or
            actors that switch CUDA device or stream: those are not reset).
        name: the serving thread's name.
    """

    def __new__(cls, model: Any = None, transport: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("InferenceServer accepts at most model and transport positionally.")
        if cls is InferenceServer:  # torchrl's dispatch: the owner depends on the service backend
            backend = resolve_service_backend(kwargs.get("service_backend"), kwargs.get("server_config"))
            if backend == "process":
                from .process_server import ProcessInferenceServer

                return ProcessInferenceServer.from_server_arguments(model, transport, **kwargs)
            if backend == "ray":
                from .ray_server import RayInferenceServer

                return object.__new__(RayInferenceServer)  # then RayInferenceServer.__init__(same arguments)
        return object.__new__(cls)

    def __init__(
        self,
        model: Callable[[TensorDictBase], TensorDictBase] | None = None,
        transport: InferenceTransport | str | None = None,
        *,
        policy_factory: Callable[[], Any] | None = None,
        service_backend: str | None = None,
        service_backend_options: dict | None = None,
        transport_options: dict | None = None,
        request_spec: TensorDictBase | None = None,
        response_spec: TensorDictBase | None = None,
        num_clients: int | None = None,
        max_batch_size: int | None = None,
        static_batch_size: int | None = None,
        min_batch_size: int | None = None,
        timeout: float | None = None,
        collate_fn: Callable[[list], TensorDictBase] | None = None,
        device: torch.device | str | None = None,
        policy_device: torch.device | str | None = None,
        output_device: torch.device | str | None = None,
        collect_stats: bool | None = None,
        stats_window_size: int | None = None,
        weight_sync: Any = None,
        weight_sync_model_id: str = "policy",
        server_config: InferenceServerConfig | None = None,
        device_config: InferenceDeviceConfig | None = None,
        shutdown_event: Any = None,
        policy_version: int = 0,
        policy_version_key: Any = "policy_version",
        interaction_type: Any = None,
        num_threads: int | None = 1,
        run_in_caller: bool = True,
        name: str = "rlserve-server",
    ):
        backend = resolve_service_backend(service_backend, server_config)
        if backend != "thread":
            raise RuntimeError(f"an InferenceServer serves from a thread; service_backend={backend!r} builds "
                               "its own owner (construct InferenceServer(...), not a subclass)")
        if service_backend_options:
            raise ValueError("service_backend_options are only valid for process or Ray services.")
        if model is None and policy_factory is None:
            raise ValueError("Either model or policy_factory must be provided.")
        if model is not None and policy_factory is not None:
            raise ValueError("model and policy_factory are mutually exclusive.")
        batching = resolve_batching(
            server_config, max_batch_size=max_batch_size, static_batch_size=static_batch_size,
            min_batch_size=min_batch_size, timeout=timeout, collect_stats=collect_stats,
            stats_window_size=stats_window_size)
        devices = resolve_devices(device_config, device=device, policy_device=policy_device,
                                  output_device=output_device)
        transport = make_transport(transport, "thread", transport_options=transport_options,
                                   request_spec=request_spec, response_spec=response_spec, num_clients=num_clients,
                                   service_in_context=service_from_context(service_backend, server_config))
        if model is None:
            model = policy_factory()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if devices.policy_device is not None and isinstance(model, torch.nn.Module):
            model.to(devices.policy_device)
        self.model = model
        self.transport = transport
        self.batching = BatchPolicy(batching.max_batch_size, batching.min_batch_size, batching.timeout)
        self.static_batch_size = batching.static_batch_size
        self.collect_stats = batching.collect_stats
        self.stats_window_size = batching.stats_window_size
        self.policy_device = self.device = devices.policy_device
        self.output_device = devices.output_device
        self.collate_fn = collate_fn
        self.request_spec = request_spec
        self.weight_sync = weight_sync
        self.weight_sync_model_id = weight_sync_model_id
        self._receiver = as_receiver(weight_sync, weight_sync_model_id, lambda: self.policy_version)
        if isinstance(policy_version_key, tuple) and len(policy_version_key) == 1:
            policy_version_key = policy_version_key[0]
        self.policy_version_key = policy_version_key
        self.policy_version = int(policy_version)
        self.num_threads = num_threads
        self.run_in_caller = bool(run_in_caller)
        self.name = name
        self._shutdown_event = shutdown_event
        stats_cls = ServerStats if self.collect_stats else NoStats
        self._stats = stats_cls(self.batching.max_batch_size, self.stats_window_size)
        self._runner = BatchRunner(
            model, self.transport, self._stats, device=self.device, output_device=self.output_device,
            collate_fn=collate_fn, policy_version_key=policy_version_key, static_batch_size=self.static_batch_size,
            interaction_type=interaction_type)
        self._handle = _Handle(self)
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stop = False
        self._started = False
        self._fork_note: str | None = None
        self._died: BaseException | None = None
        self._weights_lock = threading.Lock()
        self._serve_lock = threading.Lock()  # held around every batch and weight update, whichever thread runs it
        self._pending_weights = None  # (weights, version) from update_weights()

    @property
    def max_batch_size(self) -> int:
        """Most requests per forward pass."""
        return self.batching.max_batch_size

    @property
    def min_batch_size(self) -> int:
        """Requests that start a batch at once."""
        return self.batching.min_batch_size

    @property
    def timeout(self) -> float:
        """Seconds the oldest pending request waits for batch-mates."""
        return self.batching.timeout

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> InferenceServer:
        """Start the serving thread (again, after a shutdown). Returns ``self``.

        Requests submitted before it queue and are served once it runs.
        """
        t = self._thread
        if t is not None and t.is_alive():
            if self._serving:
                raise RuntimeError("Server is already running.")
            raise RuntimeError("the previous serving thread is still finishing a batch; start again once "
                               "it has (shutdown(timeout=...) with a longer timeout waits for it)")
        self._serving = True  # first: from its bind on, the transport's clients must find the server accepting
        try:
            self.transport.bind(self._handle)  # refuses a transport another live server serves
        except BaseException:
            self._serving = False
            raise
        if self.static_batch_size is not None and self._runner.graph is None and self._wants_cudagraph():
            self.prepare_cudagraph(self.request_spec)
        if self._receiver is not None:
            self._receiver.init_on_receiver(model=self.model)
        self._started = True
        self._stop = False
        self._died = None
        self.transport.open()
        _LIVE.add(self)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop serving; requests not yet run are answered with ServerClosedError.

        Returns within about ``timeout`` seconds (a forward still running then
        is left to finish on its own; a warning says so).
        """
        if not self._started or self._thread is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self._serving = False
        self.transport.close()
        self._stop = True
        self.transport.wake()
        # Called from inside a batch (the model, a done-callback), on the server thread or on a
        # caller running it: nothing to wait for; the server thread may itself wait for this batch.
        if threading.current_thread() is not self._thread and not self._handle.in_batch():
            self._thread.join(_left(deadline))
            if self._thread.is_alive():
                log.warning("%s: serving thread still busy after %s s (a slow forward?)", self.name, timeout)
            # a batch a caller thread is running: let it finish before the weights' receiver closes
            left = _left(deadline)
            if self._serve_lock.acquire(timeout=-1 if left is None else left):
                self._serve_lock.release()
        if self._receiver is not None:
            self._receiver.close_receiver()

    def __enter__(self) -> InferenceServer:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def is_alive(self) -> bool:
        """True while the server accepts and runs requests."""
        return self._serving and self._thread is not None and self._thread.is_alive()

    def raise_if_not_serving(self) -> None:
        """Raise ServerClosedError, or ServerDeadError with the cause, unless the server is serving."""
        self._handle.raise_if_closed()

    def client(self) -> InferenceClient:
        """An actor-side client of this server's transport."""
        return self.transport.client()

    def _forked(self) -> None:
        """In a fork child: this copy has no serving thread (see ``_after_fork_in_child``)."""
        if self._serving:
            self._serving = False
            self._fork_note = (
                f"this client is used in a process forked from the one running its InferenceServer "
                f"(pid {os.getppid()}); the server thread does not exist here. Give processes an "
                "MPTransport or ProcessServer client instead")

    # -- weights ---------------------------------------------------------------
    def update_weights(self, weights: Any, version: int | None = None, *, mark_weight_update: bool = True) -> int:
        """Push new weights (state dict, TensorDict of parameters, or module).

        Checked now, on the caller's side (ValueError on missing keys, wrong
        shapes or dtypes; the old weights keep serving), snapshotted so later
        in-place changes by the caller cannot tear them, and applied in place
        between batches. Only the newest pending set is kept. Returns the
        version answers will carry: ``version``, or one past the newest known;
        with ``mark_weight_update=False`` (torchrl's flag) the newest known one.
        """
        from .weight_sync import NoWeightSyncScheme, prepare_weights, snapshot_weights, weights_of

        if self.weight_sync is not None and not isinstance(self.weight_sync, NoWeightSyncScheme):
            # two sources of versions could interleave and run backwards: one source per server
            raise RuntimeError(
                "this server takes its weights from its weight_sync scheme; "
                "send them with scheme.send(...) instead of update_weights()"
            )
        live = weights_of(self.model)
        target = snapshot_weights(prepare_weights(live, weights), live)
        with self._weights_lock:
            pending = self._pending_weights
            if version is None:
                version = max(self.policy_version, pending[1] if pending else 0) + int(mark_weight_update)
            self._pending_weights = (target, int(version))
        t = self._thread
        if t is None or not t.is_alive():  # no serving thread that could be mid-forward
            with self._serve_lock:
                self._apply_weight_updates(from_scheme=False)
        elif self._serve_lock.acquire(blocking=False):  # not mid-batch: apply now, the version is current on return
            try:
                self._apply_weight_updates(from_scheme=False)
            finally:
                self._serve_lock.release()
        return int(version)

    def _apply_weight_updates(self, from_scheme: bool = True) -> None:
        """Under the serve lock, between batches: apply the newest weights from update_weights / weight_sync."""
        if self._pending_weights is not None:
            from .weight_sync import copy_weights_

            with self._weights_lock:
                pending, self._pending_weights = self._pending_weights, None
            if pending is not None:
                copy_weights_(self.model, pending[0])
                if pending[1] != self.policy_version:  # an unmarked update (same version) is not counted
                    self._stats.weight_updates += 1
                self.policy_version = pending[1]
        ws = self._receiver
        if ws is not None and from_scheme:
            v = ws.receive()
            if v is not None:
                self.policy_version = int(v)
                self._stats.weight_updates += 1

    # -- the loop --------------------------------------------------------------
    def _run(self) -> None:
        # Both are per-thread settings: they apply to the serving thread only.
        torch.set_grad_enabled(False)
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        tr = self.transport
        policy = self.batching
        drain = tr.drain_timed
        serve_lock = self._serve_lock
        ins: list = []
        cbs: list = []
        ts: list = []
        ev = self._shutdown_event
        try:
            while not self._stop and (ev is None or not ev.is_set()):
                if not ins:
                    tr.wait_for_work(_IDLE_WAIT_S)
                room = policy.max_batch_size - len(ins)
                if room > 0:
                    i2, c2, t2 = drain(room)
                    if i2:
                        ins += i2
                        cbs += c2
                        ts += t2
                if not ins:
                    with serve_lock:
                        self._apply_weight_updates()  # idle: keep the weights and the version current
                        tr.on_idle()
                    continue
                wait = policy.wait_time(len(ins), min(ts), _perf())
                if wait > 0:
                    tr.wait_for_work(wait)
                    continue
                n = len(ins)
                with serve_lock:
                    self._apply_weight_updates()
                    batch = ins, cbs, ts
                    ins, cbs, ts = [], [], []  # the runner answers every one of these, whatever happens
                    self._serve_batch(*batch)
                tr.on_batch_done(n)
            self._stop = True  # stopped on purpose (shutdown() or the shutdown_event): closed, not dead
        except BaseException as e:  # the loop itself broke: never leave callers waiting
            self._serving = False  # first: a caller must not start a batch while the loop exits
            self._died = e
            log.exception("%s: serving loop died", self.name)
        finally:
            self._serving = False
            tr.close()  # refuse new requests before the last drain
            if self._died is not None:
                exc = ServerDeadError(f"the inference server died: {self._died!r}")
            else:
                exc = ServerClosedError("the inference server shut down before running this request")
            self._runner.fail(cbs, exc)
            self._fail_queued(exc)
            tr.on_idle()

    def _serve_batch(self, ins: list, cbs: list, ts: list) -> None:
        """Run one drained batch (serve lock held), marking this thread as inside it."""
        state = _context.state
        prev, state.transport = state.transport, self.transport
        try:
            self._runner.run(ins, cbs, ts, self.policy_version)
        finally:
            state.transport = prev

    def _fail_queued(self, exc: BaseException) -> None:
        for _ in range(_FAIL_QUEUED_ROUNDS):
            try:
                _, cbs = self.transport.drain(1 << 16)
            except Exception:
                log.exception("%s: draining at shutdown failed", self.name)
                return
            if not cbs:
                return
            self._runner.fail(cbs, exc)

    # -- batches on a caller's thread (ServerHandle.run_inline) ----------------------
    def _run_inline(self, max_forward_s: float = math.inf) -> bool:
        """Run one batch on the calling thread; False: the transport wakes the server instead.

        The caller is about to block on its own answer anyway, so doing the
        work itself skips two thread hand-overs. The forward runs as it would
        on the server thread: under the serve lock, without grad, with the
        server's intra-op thread count.
        """
        runner = self._runner
        if runner.last_batch > 1 or runner.forward_avg_s >= max_forward_s:
            return False  # actors are queueing up (the server forms fuller batches), or forwards are long
        if torch.is_inference_mode_enabled() or _autocast_on() or _modes_on() or _dispatch_modes_on():
            # the caller's thread-local modes (inference mode, autocast, torch.device(...) as a
            # context or set_default_device, dispatch modes) would leak into the forward
            return False
        lock = self._serve_lock
        if not lock.acquire(False):
            return False  # a batch is running: the server (once woken) takes this one next
        grad = torch.is_grad_enabled()
        nt = self.num_threads
        old_nt = torch.get_num_threads() if nt is not None else None
        try:
            if not self._serving:
                return False
            torch.set_grad_enabled(False)
            if old_nt is not None and old_nt != nt:
                torch.set_num_threads(nt)
            try:
                self._apply_weight_updates()
            except Exception:
                log.exception("%s: applying new weights failed on a caller thread", self.name)
                return False  # the server thread meets the failure too, and handles it as always
            try:
                ins, cbs, ts = self.transport.drain_timed(self.batching.max_batch_size)
                if ins:  # else the server, awake after all, took them
                    self._serve_batch(ins, cbs, ts)
            except BaseException as e:
                # As on the server thread (e.g. the model raised SystemExit; the batch is
                # answered): the server dies and the caller sees the exception. Callers whose
                # answer it cut off (Ctrl-C mid-delivery) then get ServerDeadError, not a hang.
                self._die_from_caller(e)
                raise
            return True
        finally:
            torch.set_grad_enabled(grad)
            if old_nt is not None and old_nt != nt:
                torch.set_num_threads(old_nt)
            lock.release()

    def _die_from_caller(self, e: BaseException) -> None:
        """A caller-run batch broke the way that kills the serving loop: stop the loop the same way."""
        log.exception("%s: serving loop died (in a batch run on a caller thread)", self.name)
        self._died = e
        self._serving = False  # refuse new calls now; the loop's exit fails whatever is still queued
        self._stop = True
        self.transport.wake()


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Handle:
    """The :class:`~rlserve.transport.ServerHandle` of one server: all a transport sees of it."""

    __slots__ = ("_s", "inline_allowed", "run_inline", "__weakref__")

    def __init__(self, server: InferenceServer):
        self._s = server
        # Caller-run batches: only a greedy server (min_batch_size=1) that allows them.
        self.inline_allowed = server.run_in_caller and server.batching.min_batch_size == 1
        # ServerHandle.run_inline: the server's own method (one call less on the hot path)
        self.run_inline = server._run_inline if self.inline_allowed else _never

    @property
    def accepting(self) -> bool:
        return self._s._serving

    def raise_if_closed(self) -> None:
        s = self._s
        if s._serving:  # the hot path: one flag, which the loop clears on any exit
            return
        if s._fork_note is not None:
            raise ServerDeadError(s._fork_note)
        if s._died is not None:
            raise ServerDeadError(f"the inference server died: {s._died!r}") from s._died
        t = s._thread
        if s._started and t is not None and not t.is_alive() and not s._stop:
            raise ServerDeadError("the inference server thread is gone")
        if not s._started:
            raise ServerClosedError("the inference server is not started; call server.start() first")
        raise ServerClosedError("the inference server is shut down")

    def may_still_answer(self) -> bool:
        s = self._s
        t = s._thread
        return s._fork_note is None and t is not None and t.is_alive()

    @property
    def died(self) -> BaseException | None:
        return self._s._died

    @property
    def stopping(self) -> bool:
        return self._s._stop

    @property
    def policy_version(self) -> int:
        return self._s.policy_version

    @property
    def policy_version_key(self) -> Any:
        return self._s.policy_version_key

    @property
    def max_batch_size(self) -> int:
        return self._s.batching.max_batch_size

    def in_batch(self) -> bool:
        return _context.state.transport is self._s.transport


def _never(max_forward_s: float = math.inf) -> bool:
    return False
