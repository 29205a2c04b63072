"""AsyncBatchedCollector: many environments, one batched policy server, batches of experience.

Each environment is stepped by its own actor thread; every action comes from an
:class:`~rlserve.InferenceServer` the collector owns, so the policy runs once
per batch of pending actors instead of once per step. Iterating the collector
yields TensorDicts of ``frames_per_batch`` transitions while the actors keep
stepping (the trainer learns on one batch while the next is gathered), and the
``policy_version`` of each transition tells how far acting lags learning.
"""
from __future__ import annotations

import sys
import threading
import time

import torch

from ._env_actor import EnvActor, EnvError, Sink, stack_transitions
from .errors import ServerDeadError
from .server import InferenceServer
from .transports.threading import ThreadingTransport

__all__ = ["AsyncBatchedCollector", "EnvError"]

_WAIT_S = 0.2  # liveness-check period while waiting for a batch


class AsyncBatchedCollector:
    """Run ``num_envs`` environments against a served policy; iterate to get batches.

    Args:
        create_env_fn: a callable returning an environment (a gymnasium env, or
            any object with ``reset()`` and ``step(action)``), or a list of such
            callables, one per environment.
        policy: the model served to every actor: batched TensorDict in (with
            ``obs_key``), batched TensorDict out (with ``action_key``; every other
            output key, e.g. a log-prob, is kept in the data).
        frames_per_batch: transitions per yielded TensorDict.
        total_frames: stop after this many frames (``-1``: iterate forever).
        num_envs: number of environments/actors when ``create_env_fn`` is one callable.
        weight_sync: a :class:`~rlserve.WeightSyncScheme` handed to the server;
            the trainer calls ``scheme.send(...)`` (or :meth:`update_policy_weights_`).
        max_buffered_frames: actors pause while this many transitions wait
            to be yielded (default ``2 * frames_per_batch``): bounds memory and lag.
        seed: env ``i`` is reset with ``seed + i`` the first time (if it takes a seed).
        progress: show a tqdm bar (``None``: only when stderr is a tty and
            ``total_frames`` is set).
        request_timeout: seconds an actor waits for one action (``None``: no
            limit; a dead server is still noticed within ~0.2 s).
        server_kwargs: extra keyword arguments for the :class:`InferenceServer`
            (``max_batch_size`` defaults to ``num_envs``).
        actor_type: ``"thread"`` (default: actors are threads of this process) or
            ``"process"`` (one child process per env, served through
            :class:`~rlserve.MPTransport`; ``create_env_fn`` must then be
            picklable, e.g. ``functools.partial(gym.make, "CartPole-v1")``).
        mp_context: start method of process actors (default ``"spawn"``).
    """

    def __init__(self, create_env_fn, policy, frames_per_batch: int, total_frames: int = -1, *,
                 num_envs: int | None = None, weight_sync=None, max_buffered_frames: int | None = None,
                 seed: int | None = None, progress: bool | None = None, request_timeout: float | None = None,
                 obs_key: str = "observation", action_key: str = "action", server_kwargs: dict | None = None,
                 actor_type: str = "thread", mp_context: str = "spawn"):
        if isinstance(create_env_fn, (list, tuple)):
            fns = list(create_env_fn)
            if num_envs is not None and num_envs != len(fns):
                raise ValueError(f"num_envs={num_envs} but {len(fns)} create_env_fn were given")
        else:
            fns = [create_env_fn] * (num_envs if num_envs is not None else 1)
        if not fns or not all(callable(f) for f in fns):
            raise TypeError("create_env_fn must be a callable (or a non-empty list of callables) returning an env")
        if frames_per_batch < 1:
            raise ValueError(f"frames_per_batch must be >= 1, got {frames_per_batch}")
        if actor_type not in ("thread", "process"):
            raise ValueError(f"actor_type must be 'thread' or 'process', got {actor_type!r}")
        self.actor_type, self.mp_context = actor_type, mp_context
        if actor_type == "process" and mp_context != "fork":
            _check_picklable(fns)
        self.create_env_fns = fns
        self.num_envs = len(fns)
        self.frames_per_batch = int(frames_per_batch)
        self.total_frames = int(total_frames)
        self.seed = seed
        self.obs_key, self.action_key = obs_key, action_key
        self.request_timeout = request_timeout
        self.progress = progress
        kw = dict(max_batch_size=self.num_envs)
        kw.update(server_kwargs or {})
        self.weight_sync = weight_sync
        if actor_type == "process":
            from .transports.mp import MPTransport

            self.transport = MPTransport(max_clients=max(64, self.num_envs))
        else:
            self.transport = ThreadingTransport()
        self.server = InferenceServer(policy, self.transport, weight_sync=weight_sync, **kw)
        cap = max_buffered_frames if max_buffered_frames is not None else 2 * self.frames_per_batch
        self._sink = Sink(self.frames_per_batch, max(cap, self.frames_per_batch))
        self._threads: list[threading.Thread] = []
        self._started = self._closed = False
        self._pushed_version = 0
        self.frames = 0  # frames yielded so far
        self.batches = 0
        self._t0 = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "AsyncBatchedCollector":
        """Start the server and the actors (iteration does this on its own)."""
        if self._closed:
            raise RuntimeError("this collector is shut down; create a new one")
        if self._started:
            return self
        self._started = True
        self.server.start()
        self._t0 = time.monotonic()
        client = self.transport.client()
        if self.actor_type == "process":
            from ._proc_actor import ProcessActors

            self._threads.append(ProcessActors(
                self.create_env_fns, client, self._sink, seed=self.seed, obs_key=self.obs_key,
                action_key=self.action_key, timeout=self.request_timeout, mp_context=self.mp_context))
            return self
        for i, fn in enumerate(self.create_env_fns):
            actor = EnvActor(i, fn, client, self._sink, seed=None if self.seed is None else self.seed + i,
                             obs_key=self.obs_key, action_key=self.action_key, timeout=self.request_timeout)
            t = threading.Thread(target=actor.run, name=f"rlserve-env-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the actors, then the server. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._sink.stop()
        for t in self._threads:
            if hasattr(t, "stop"):  # process actors watch their own stop flag
                t.stop()
        self.server.shutdown()  # actors blocked on an answer get ServerClosedError at once
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "AsyncBatchedCollector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            if self._started and not self._closed:
                self.shutdown(timeout=0.5)
        except Exception:
            pass

    # -- data ------------------------------------------------------------------
    def __iter__(self):
        self.start()
        bar = self._bar()
        try:
            while self.total_frames < 0 or self.frames < self.total_frames:
                td = self.next_batch()
                if bar is not None:
                    bar.update(td.shape[0])
                yield td
        finally:
            if bar is not None:
                bar.close()

    def next_batch(self, timeout: float | None = None):
        """Block for the next ``frames_per_batch`` transitions; raise the first actor error."""
        self.start()
        sink = self._sink
        n = self.frames_per_batch
        deadline = None if timeout is None else time.monotonic() + timeout
        self._raise_if_broken()  # a failed env stops collection even when data is buffered
        while len(sink.buf) < n:
            self._raise_if_broken()
            sink.ready.clear()
            if len(sink.buf) >= n:
                break
            sink.ready.wait(_WAIT_S)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no batch of {n} frames within {timeout} s")
        pop = sink.buf.popleft
        recs = [pop() for _ in range(n)]
        with sink.room:
            sink.room.notify_all()
        self.frames += n
        self.batches += 1
        return stack_transitions(recs, self.obs_key)

    def _raise_if_broken(self) -> None:
        err = self._sink.error
        if err is not None:
            raise err
        if self._closed:
            raise RuntimeError("the collector is shut down")
        if not self.server.is_alive:
            self.server.raise_if_not_serving()  # ServerDeadError naming the cause
            raise ServerDeadError("the collector's inference server stopped")
        if not any(t.is_alive() for t in self._threads):
            raise RuntimeError("every actor thread has exited")

    def _bar(self):
        show = self.progress
        if show is None:
            show = self.total_frames > 0 and sys.stderr.isatty()
        if not show:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total_frames if self.total_frames > 0 else None, unit="frame", dynamic_ncols=True)

    # -- weights and figures ---------------------------------------------------
    def update_policy_weights_(self, weights=None) -> int:
        """Push the trainer's weights to the served policy; returns their version.

        ``weights``: an ``nn.Module``, state dict or TensorDict of weights. With a
        ``weight_sync`` scheme it is sent through the scheme (``None`` lets the
        scheme use the model given to ``init_on_sender``); otherwise it goes to
        :meth:`InferenceServer.update_weights` and is applied between batches.
        """
        if self.weight_sync is not None:
            if isinstance(weights, torch.nn.Module) or weights is None:
                v = self.weight_sync.send(model=weights)
            else:
                v = self.weight_sync.send(weights=weights)
            self._pushed_version = int(v) if v is not None else self._pushed_version + 1
            return self._pushed_version
        if weights is None:
            raise ValueError("update_policy_weights_() needs the trainer's weights (module or state dict) "
                             "when the collector has no weight_sync scheme")
        v = max(self._pushed_version, self.server.policy_version) + 1
        self.server.update_weights(weights, version=v)
        self._pushed_version = v
        return v

    @property
    def started_at(self) -> float | None:
        """``time.monotonic()`` when collection started (None before)."""
        return self._t0

    @property
    def policy_version(self) -> int:
        """Newest version pushed through this collector (or applied by the server)."""
        return max(self._pushed_version, self.server.policy_version)

    @property
    def episodes(self) -> list:
        """Finished episodes so far: ``(monotonic time, env_id, return, length)``."""
        return list(self._sink.episodes)

    def stats(self) -> dict:
        """Collector figures plus the server's (``"server"``)."""
        el = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        return {
            "frames": self.frames,
            "batches": self.batches,
            "frames_per_s": self.frames / el if el > 0 else 0.0,
            "episodes": len(self._sink.episodes),
            "elapsed_s": el,
            "server": self.server.stats(),
        }


def _check_picklable(fns) -> None:
    """Process actors receive their env factory by pickle: fail here, clearly, not in a child."""
    import pickle

    for i, fn in enumerate(fns):
        try:
            pickle.dumps(fn)
        except Exception as e:
            raise TypeError(
                f"create_env_fn for env {i} cannot be pickled ({type(e).__name__}: {e}); process actors need "
                "a picklable factory such as functools.partial(gym.make, 'CartPole-v1') or a module-level "
                "function, not a lambda or a local function") from e
