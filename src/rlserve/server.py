"""InferenceServer: gather pending requests, run one forward, route rows back."""
from __future__ import annotations

import logging
import threading
import time

import torch

from ._caller_threads import CallerThreads
from .batching import BatchPolicy
from ._fastpath import direct_call
from .collate import (
    batch_td,
    explain_failure,
    group_by_signature,
    is_fast,
    signature_device,
    split_leaves,
    split_rows,
    stack_group,
    stack_leaves,
)
from .errors import ServerClosedError, ServerDeadError
from .stats import ServerStats

__all__ = ["InferenceServer"]

log = logging.getLogger("rlserve")
_perf = time.perf_counter
_IDLE_WAIT_S = 0.05  # how long an idle loop sleeps before re-checking for shutdown


class InferenceServer(CallerThreads):
    """Serve ``model`` to many actors through ``transport``, batching their requests.

    Args:
        model: any callable from a batched TensorDict to a batched TensorDict
            (typically a ``TensorDictModule``). It runs under ``torch.no_grad``
            on the server thread (or, see ``run_in_caller``, on a blocked caller's).
        transport: an :class:`~rlserve.InferenceTransport`.
        max_batch_size: most requests per forward pass.
        min_batch_size: run a batch once this many requests are pending...
        timeout: ...or once the oldest pending request has waited this many
            seconds since it arrived. With ``min_batch_size=1`` (default) the
            server runs whatever is pending at once; batches grow while the
            model is busy.
        device: move each batch here before the forward (``None``: leave it).
        output_device: move answers here (``None``: back to the device the
            requests came from when ``device`` is set, else leave them).
        collate_fn: ``list[TensorDict] -> TensorDict`` replacing the built-in
            stacking (it receives shallow copies, so it cannot alias requests).
        weight_sync: a :class:`~rlserve.WeightSyncScheme`; the server wires its
            receiver side and applies new weights between batches.
        policy_version_key: key of the integer version stamped on every
            answer; ``None`` disables the stamp.
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
    """

    def __init__(
        self,
        model,
        transport,
        *,
        max_batch_size: int = 64,
        min_batch_size: int = 1,
        timeout: float = 0.01,
        device=None,
        output_device=None,
        collate_fn=None,
        weight_sync=None,
        policy_version_key: str | None = "policy_version",
        num_threads: int | None = 1,
        run_in_caller: bool = True,
        name: str = "rlserve-server",
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self._direct = direct_call(model)  # None unless model is a plain TensorDictModule
        self.transport = transport
        # transport hooks, looked up once (see transport.py): answer whole batches; queue length
        self._whole_batches = getattr(transport, "resolve_batch", None) is not None and not getattr(
            transport, "wants_rows", True)
        self._pending_fn = getattr(transport, "_pending", None)
        # blocked callers woken in turn once their batch is answered, and the fallback (threading.py)
        self._wake_answered = getattr(transport, "_wake_answered", None)
        self._release_answered = getattr(transport, "_release_answered", None)
        self.batching = BatchPolicy(max_batch_size, min_batch_size, timeout)
        self.device = torch.device(device) if device is not None else None
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.collate_fn = collate_fn
        self.weight_sync = weight_sync
        self.policy_version_key = policy_version_key
        self.policy_version = 0
        self.num_threads = num_threads
        self.run_in_caller = bool(run_in_caller)
        self.name = name
        self._stats = ServerStats(self.batching.max_batch_size)
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stop = False
        self._started = False
        self._died: BaseException | None = None
        self._accepted: dict = {}  # signatures the model ran, newest last (bounded), for error messages
        self._weights_lock = threading.Lock()
        self._serve_lock = threading.Lock()  # held around every batch and weight update, whichever thread runs it
        self._inline_ident = None  # the caller thread running a batch (see _serve_in_caller)
        self._last_batch = 0  # size of the newest batch: >1 means actors queue up, so no caller-run batches
        self._forward_avg_s = 0.0  # moving average of forward times (PortQueueTransport's inline rule)
        self._answer_mark = -1  # requests queued when the newest batch began to be answered (-1: unknown)
        self._pending_weights = None  # (weights, version) from update_weights()

    @property
    def max_batch_size(self) -> int:
        return self.batching.max_batch_size

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "InferenceServer":
        """Start the serving thread. Returns ``self``."""
        if self._started:
            raise RuntimeError("an InferenceServer can be started once; create a new one")
        attach = getattr(self.transport, "_attach", None)
        if attach is not None:
            attach(self)  # refuses a transport another live server serves: before any side effect
        if self.weight_sync is not None:
            self.weight_sync.init_on_receiver(model=self.model, server=self)
        self._started = True
        reopen = getattr(self.transport, "_reopen", None)
        if reopen is not None:
            reopen()
        self._serving = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop serving. Requests not yet run are answered with ServerClosedError."""
        if not self._started or self._thread is None:
            return
        self._serving = False
        close = getattr(self.transport, "_close", None)
        if close is not None:
            close()
        self._stop = True
        wake = getattr(self.transport, "_wake", None)
        if wake is not None:
            wake()
        # Called from inside a batch (the model, a done-callback), on the server thread or on a
        # caller running it: nothing to wait for; the server thread may itself wait for this batch.
        if threading.current_thread() is not self._thread and self._inline_ident != threading.get_ident():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: serving thread still busy after %s s (a slow forward?)", self.name, timeout)
            # a batch a caller thread is running: let it finish before the weights' receiver closes
            if self._serve_lock.acquire(timeout=-1 if timeout is None else timeout):
                self._serve_lock.release()
        closer = getattr(self.weight_sync, "_close_receiver", None)
        if closer is not None:
            closer()

    def __enter__(self) -> "InferenceServer":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def is_alive(self) -> bool:
        """True while the server accepts and runs requests."""
        return self._serving and self._thread is not None and self._thread.is_alive()

    def _thread_running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def _raise_if_not_serving(self) -> None:
        # Hot path: one flag. The loop clears it on any exit, normal or not.
        if self._serving:
            return
        if self._died is not None:
            raise ServerDeadError(f"the inference server died: {self._died!r}") from self._died
        if self._started and self._thread is not None and not self._thread.is_alive() and not self._stop:
            raise ServerDeadError("the inference server thread is gone")
        if not self._started:
            raise ServerClosedError("the inference server is not started; call server.start() first")
        raise ServerClosedError("the inference server is shut down")

    def client(self):
        """An actor-side client of this server's transport."""
        return self.transport.client()

    def stats(self) -> dict:
        """Counters and latency percentiles; see the README for the fields."""
        return self._stats.snapshot(self.policy_version)

    # -- weights ---------------------------------------------------------------
    def update_weights(self, weights, version: int | None = None) -> int:
        """Push new weights (state dict, TensorDict of parameters, or module).

        Checked now, on the caller's side (ValueError on missing keys, wrong
        shapes or dtypes; the old weights keep serving), snapshotted so later
        in-place changes by the caller cannot tear them, and applied in place
        between batches. Only the newest pending set is kept. Returns the
        version answers will carry (``version``, or one past the newest known).
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
                version = max(self.policy_version, pending[1] if pending else 0) + 1
            self._pending_weights = (target, int(version))
        t = self._thread
        if t is None or not t.is_alive():  # no serving thread that could be mid-forward
            with self._serve_lock:
                self._apply_weight_updates(from_scheme=False)
        return int(version)

    def _apply_weight_updates(self, from_scheme: bool = True) -> None:
        """Under the serve lock, between batches: apply the newest weights from update_weights / weight_sync."""
        if self._pending_weights is not None:
            from .weight_sync import copy_weights_

            with self._weights_lock:
                pending, self._pending_weights = self._pending_weights, None
            if pending is not None:
                copy_weights_(self.model, pending[0])
                self.policy_version = pending[1]
        ws = self.weight_sync
        if ws is not None and from_scheme:
            v = ws.receive()
            if v is not None:
                self.policy_version = int(v)

    # -- the loop --------------------------------------------------------------
    def _run(self) -> None:
        # Both are per-thread settings: they apply to the serving thread only.
        torch.set_grad_enabled(False)
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        tr = self.transport
        policy = self.batching
        drain = getattr(tr, "drain_timed", None)
        if drain is None:
            def drain(n, _drain=tr.drain):
                ins, cbs = _drain(n)
                return ins, cbs, [_perf()] * len(ins)
        pending = self._pending_fn  # in-process transports only (see below)
        serve_lock = self._serve_lock
        # callers that are threads of this process and resubmit at once (see _let_callers_return)
        wait_count = getattr(tr, "_wait_for_count", None) if getattr(tr, "_callers_resubmit", False) else None
        ins: list = []
        cbs: list = []
        ts: list = []
        try:
            while not self._stop:
                if not ins:
                    tr.wait_for_work(_IDLE_WAIT_S)
                room = policy.max_batch_size - len(ins)
                if room > 0:
                    i2, c2, t2 = drain(room)
                    if i2:
                        if ins:
                            ins += i2
                            cbs += c2
                            ts += t2
                        else:
                            ins, cbs, ts = list(i2), list(c2), list(t2)
                if not ins:
                    with serve_lock:
                        self._apply_weight_updates()  # idle: keep the weights and the version current
                        if self._release_answered is not None:
                            self._release_answered()  # a turn-by-turn wake-up cut short (see threading.py)
                    continue
                wait = policy.wait_time(len(ins), min(ts), _perf())
                if wait > 0:
                    tr.wait_for_work(wait)
                    continue
                with serve_lock:
                    self._apply_weight_updates()
                    batch_ins, batch_cbs, batch_ts = ins, cbs, ts
                    ins, cbs, ts = [], [], []  # _process answers every one of these, whatever happens
                    self._answer_mark = -1
                    self._process(batch_ins, batch_cbs, batch_ts)
                if wait_count is not None and self._last_batch > 1:
                    self._let_callers_return(wait_count, pending, self._last_batch)
                elif pending is not None and 0 < pending() < policy.max_batch_size:
                    # Requests are queued but the batch is not full: hand the GIL over once
                    # so request threads about to enqueue do so before the next drain.
                    time.sleep(0)
        except BaseException as e:  # the loop itself broke: never leave callers waiting
            self._serving = False  # first: a caller must not start a batch while the loop exits
            self._died = e
            log.exception("%s: serving loop died", self.name)
        finally:
            self._serving = False
            close = getattr(tr, "_close", None)
            if close is not None:
                close()  # refuse new requests before the last drain
            if self._died is not None:
                exc = ServerDeadError(f"the inference server died: {self._died!r}")
            else:
                exc = ServerClosedError("the inference server shut down before running this request")
            self._fail(cbs, exc)
            self._fail_queued(exc)
            if self._release_answered is not None:
                self._release_answered()

    def _fail(self, cbs, exc) -> None:
        for cb in cbs:
            self._resolve_exc(cb, exc)

    def _fail_queued(self, exc) -> None:
        for _ in range(1000):  # bounded: a misbehaving transport cannot keep us here
            try:
                _, cbs = self.transport.drain(1 << 16)
            except Exception:
                log.exception("%s: draining at shutdown failed", self.name)
                return
            if not cbs:
                return
            self._fail(cbs, exc)

    def _resolve_exc(self, cb, exc) -> None:
        try:
            self.transport.resolve_exception(cb, exc)
        except Exception:
            log.exception("%s: could not deliver an error to a caller", self.name)

    def _process(self, ins: list, cbs: list, ts: list) -> None:
        self._last_batch = len(ins)
        self._stats.record_waits(_perf(), ts)
        groups, bad = group_by_signature(ins)
        for i, err in bad:
            self._stats.rejected += 1
            self._resolve_exc(cbs[i], err)
        if len(groups) == 1 and not bad:
            (sig, _), = groups.items()
            self._run_group(sig, ins, cbs, ts)
            return
        todo = list(groups.items())
        for k, (sig, idx) in enumerate(todo):
            try:
                self._run_group(sig, [ins[i] for i in idx], [cbs[i] for i in idx], [ts[i] for i in idx])
            except BaseException as e:  # the loop is dying: answer the groups not yet run
                for _, rest in todo[k + 1:]:
                    self._fail([cbs[i] for i in rest], ServerDeadError(f"the inference server died: {e!r}"))
                raise

    def _run_group(self, sig, ins: list, cbs: list, ts: list) -> None:
        n = len(ins)
        direct = self._direct
        if direct is not None and is_fast(sig) and self.collate_fn is None and self.device is None and direct.usable():
            self._run_direct(direct, sig, ins, cbs, ts)
            return
        try:
            if self.collate_fn is not None:
                batch = self.collate_fn([td.clone() for td in ins])  # a copy: cannot alias requests
            else:
                batch = stack_group(sig, ins)
            back_to = self.output_device
            if self.device is not None:
                if back_to is None:
                    back_to = signature_device(sig)
                batch = batch.to(self.device)
            t0 = _perf()
            out = self.model(batch)
            t_fwd = _perf() - t0
            if back_to is not None and out is not None and hasattr(out, "to"):
                out = out.to(back_to)
            if self._whole_batches:
                rows = None
            else:
                rows = split_rows(out, n, self.policy_version_key, self.policy_version)
        except BaseException as e:
            self._fail_group(sig, e, cbs)
            return
        self._deliver(sig, out, rows, cbs, ts, n, t_fwd)

    def _fail_group(self, sig, e: BaseException, cbs: list) -> None:
        """The batch could not run: its callers get the (explained) error."""
        self._stats.errors += len(cbs)
        exc = self._explain(sig, e) if isinstance(e, Exception) else e
        for cb in cbs:
            self._resolve_exc(cb, exc)
        if not isinstance(e, Exception):
            raise e  # KeyboardInterrupt / SystemExit: the batch is answered, now stop

    def _deliver(self, sig, out, rows, cbs: list, ts: list, n: int, t_fwd: float) -> None:
        """Answer a batch that ran: the whole batch through resolve_batch, or row by row."""
        tr = self.transport
        self._remember(sig)
        self._forward_avg_s += (t_fwd - self._forward_avg_s) * 0.125  # smooth: one slow batch is no trend
        if self._answer_mark < 0 and self._pending_fn is not None:
            self._answer_mark = self._pending_fn()
        try:
            if rows is None:  # self._whole_batches
                try:
                    tr.resolve_batch(cbs, out, None)
                except Exception:
                    # Contract: resolve_batch answers all rows or raises before answering any.
                    log.exception("%s: resolve_batch failed", self.name)
                    self._fail(cbs, ServerDeadError("the transport could not deliver this answer"))
            else:
                resolve = tr.resolve
                for cb, row in zip(cbs, rows):
                    try:
                        resolve(cb, row)
                    except Exception:
                        log.exception("%s: could not deliver an answer", self.name)
        finally:
            if self._wake_answered is not None:
                self._wake_answered()  # blocked callers answered above (ThreadingTransport)
        self._stats.record_batch(n, t_fwd, _perf(), ts)

    def _run_direct(self, direct, sig, ins: list, cbs: list, ts: list) -> None:
        """_run_group for a plain TensorDictModule on flat requests: no wrapper, no batch TensorDict."""
        n = len(ins)
        try:
            src = stack_leaves(ins)
            bs = torch.Size([n, *sig[1]])
            t0 = _perf()
            src = direct(src, bs)
            t_fwd = _perf() - t0
            if self._whole_batches:
                out, rows = batch_td(sig, src, n), None
            else:
                out = None
                rows = split_leaves(src, bs, sig[2], self.policy_version_key, self.policy_version)
                if self.output_device is not None:
                    rows = [r.to(self.output_device) for r in rows]
        except BaseException as e:
            self._fail_group(sig, e, cbs)
            return
        self._deliver(sig, out, rows, cbs, ts, n, t_fwd)

    def _remember(self, sig) -> None:
        acc = self._accepted
        if sig not in acc:
            acc[sig] = True
            if len(acc) > 64:
                del acc[next(iter(acc))]

    def _explain(self, sig, e: Exception) -> Exception:
        return explain_failure(self._accepted, sig, e)
