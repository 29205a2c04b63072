"""Environment actors in child processes: the same EnvActor loop, served through MPTransport.

A child steps its env with an :class:`~rlserve.transports.mp.MPClient` and ships
each transition (numpy arrays, cheap to pickle) to the collector through a
bounded ``multiprocessing`` queue; a feeder thread in the collector's process
turns them back into tensors and appends them to the same :class:`Sink` the
thread actors use. A full queue blocks the children (backpressure); a child
that dies without a word is reported by the feeder.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import threading
import time
import traceback

import numpy as np
import torch

from ._env_actor import EnvActor, EnvError, Sink
from .errors import ServerDeadError

__all__ = ["ProcessActors"]

_WAIT_S = 0.2


class _Episodes:
    def __init__(self, sink):
        self._sink = sink

    def append(self, ep) -> None:
        self._sink.flush()  # the episode's transitions go first
        self._sink._q.put(("ep", ep))


class _ChildSink:
    """The child's stand-in for :class:`Sink`: forwards everything to the parent's queue."""

    def __init__(self, env_id, q, stop_ev, chunk_size):
        self.env_id = env_id
        self._q = q
        self._stop = stop_ev
        self.episodes = _Episodes(self)
        self._chunk: list = []
        self.chunk_size = chunk_size

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def put(self, rec) -> None:
        if len(rec) == 2:  # a torchrl env's transition TensorDict: chunks travel stacked
            chunk = self._chunk
            chunk.append(rec)
            if len(chunk) >= self.chunk_size:
                self.flush()
            return
        env_id, obs, row, r, term, trunc, nobs = rec
        row = {k: v.numpy() for k, v in row.items()} if type(row) is dict else row
        chunk = self._chunk
        chunk.append((env_id, obs.numpy(), row, r, term, trunc, nobs.numpy()))
        if len(chunk) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Send the buffered transitions as one message (one pickle, one pipe write)."""
        if not self._chunk:
            return
        chunk, self._chunk = self._chunk, []
        if len(chunk[0]) == 2:  # torchrl transitions: one stacked TensorDict (one pickle of whole columns)
            # Pickled here, by value: a queue would share each tensor through a file descriptor of its
            # own (torch's reducers), slow, and lost if this process ends before the parent reads it.
            msg = ("td", [r[0] for r in chunk], pickle.dumps(_stack(chunk), protocol=pickle.HIGHEST_PROTOCOL))
        else:
            msg = ("t", chunk)
        while not self._stop.is_set():
            try:
                self._q.put(msg, timeout=_WAIT_S)
                return
            except queue.Full:
                continue

    def fail(self, exc: BaseException) -> None:
        self.flush()
        if isinstance(exc, EnvError):
            cause = exc.__cause__
            info = ("env", exc.phase, type(cause).__name__ if cause else "Error", str(cause) if cause else str(exc))
        elif isinstance(exc, ServerDeadError):
            info = ("dead", str(exc))
        else:
            info = ("other", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        self._q.put(("error", self.env_id, info))


def _child_main(env_id, make_env, client, q, stop_ev, seed, obs_key, action_key, timeout, chunk_size):
    torch.set_num_threads(1)
    actor = EnvActor(env_id, make_env, client, _ChildSink(env_id, q, stop_ev, chunk_size), seed=seed,
                     obs_key=obs_key, action_key=action_key, timeout=timeout)
    try:
        actor.run()
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
        if stop_ev.is_set():
            # The parent stopped reading: do not wait at exit to flush to it. Otherwise (an
            # error) exit only once the queue is flushed, or the error message would be lost;
            # a parent that stops reading meanwhile terminates us after its join timeout.
            q.cancel_join_thread()


def _stack(chunk: list):
    """One TensorDict of a chunk's transitions (tensordict's lazy stack when their keys differ)."""
    tds = [r[1] for r in chunk]
    try:
        return torch.stack(tds)
    except (RuntimeError, KeyError, ValueError):
        from tensordict import LazyStackedTensorDict

        return LazyStackedTensorDict(*tds, stack_dim=0)


def _rebuild_error(env_id, info) -> BaseException:
    kind = info[0]
    if kind == "env":
        _, phase, tname, msg = info
        cause = RuntimeError(f"{tname}: {msg}")
        err = EnvError(env_id, phase, cause)
        err.args = (f"environment {env_id} raised in {phase}: {tname}: {msg}",)
        err.__cause__ = cause
        return err
    if kind == "dead":
        return ServerDeadError(info[1])
    return RuntimeError(f"the actor process of environment {env_id} failed: {info[1]}\n{info[2]}")


def _to_tensors(rec):
    env_id, obs, row, r, term, trunc, nobs = rec
    if type(row) is dict:
        row = {k: torch.from_numpy(np.asarray(v)) for k, v in row.items()}
    return env_id, torch.from_numpy(obs), row, r, term, trunc, torch.from_numpy(nobs)


class ProcessActors:
    """One child process per env plus a feeder thread; looks like a list of threads to the collector."""

    def __init__(self, fns, client, sink: Sink, *, seed, obs_key, action_key, timeout, mp_context="spawn",
                 chunk_size=None):
        # a few transitions per message amortise pickling; small enough to keep batches fresh
        chunk_size = chunk_size or max(1, min(16, sink.target // max(1, len(fns))))
        ctx = mp.get_context(mp_context)
        self.sink = sink
        self.q = ctx.Queue(maxsize=max(8, sink.cap // chunk_size))
        self.stop_ev = ctx.Event()
        self.procs = [
            ctx.Process(target=_child_main, name=f"rlserve-env-{i}", daemon=True,
                        args=(i, fn, client, self.q, self.stop_ev, None if seed is None else seed + i,
                              obs_key, action_key, timeout, chunk_size))
            for i, fn in enumerate(fns)
        ]
        for p in self.procs:
            p.start()
        self.feeder = threading.Thread(target=self._feed, name="rlserve-env-feeder", daemon=True)
        self.feeder.start()

    def _feed(self) -> None:
        sink, q = self.sink, self.q
        next_check = time.monotonic() + _WAIT_S
        while not sink.stopped:
            try:
                kind, *rest = q.get(timeout=_WAIT_S)
            except queue.Empty:
                kind = None
            if kind == "t":
                for rec in rest[0]:
                    sink.put(_to_tensors(rec))
            elif kind == "td":
                for env_id, td in zip(rest[0], pickle.loads(rest[1]).unbind(0)):
                    sink.put((env_id, td))
            elif kind == "ep":
                sink.episodes.append(rest[0])
            elif kind == "error":
                sink.fail(_rebuild_error(*rest))
            if time.monotonic() >= next_check:  # a child killed outright sends nothing
                next_check = time.monotonic() + _WAIT_S
                for i, p in enumerate(self.procs):
                    if p.exitcode is not None and not sink.stopped:
                        time.sleep(_WAIT_S)  # let its own error message arrive first
                        self._drain_errors()
                        sink.fail(EnvError(i, "its actor process", RuntimeError(
                            f"the process exited with code {p.exitcode} (its stderr may say why)")))
                        return

    def _drain_errors(self) -> None:
        try:
            while True:
                kind, *rest = self.q.get_nowait()
                if kind == "error":
                    self.sink.fail(_rebuild_error(*rest))
        except queue.Empty:
            pass

    def stop(self) -> None:
        self.stop_ev.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(1.0)
        self.feeder.join(max(0.5, deadline - time.monotonic()))
        self.q.cancel_join_thread()
        self.q.close()

    def is_alive(self) -> bool:
        # the feeder outlives the children until it has reported why they are gone
        return self.feeder.is_alive() or any(p.is_alive() for p in self.procs)
