"""AsyncBatchedCollector: many environments, one batched policy server, batches of experience.

Each environment is stepped by its own actor (a thread, or a process); every
action comes from an :class:`~rlserve.InferenceServer` the collector owns, so
the policy runs once per batch of pending actors instead of once per step.
Iterating the collector yields TensorDicts of ``frames_per_batch`` transitions
while the actors keep stepping (the trainer learns on one batch while the next
is gathered), and the ``policy_version`` of each transition tells how far
acting lags learning. Environments are gymnasium-style (``reset()``/``step()``)
or torchrl ``EnvBase`` (their whole step TensorDict goes to the policy).

The constructor takes torchrl 0.14's ``AsyncBatchedCollector`` arguments as
well as rlserve's own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from typing import Any, Callable, Iterator

import torch

from ._collector_args import resolve
from ._td import TensorDict
from ._env_actor import EnvActor, EnvError, Sink, stack_transitions
from .errors import ServerDeadError
from .server import InferenceServer
from .transports.threading import ThreadingTransport

__all__ = ["AsyncBatchedCollector", "EnvError"]

_WAIT_S = 0.2  # liveness-check period while waiting for a batch


class AsyncBatchedCollector:
    """Run environments against a served policy; iterate to get batches of transitions.

    Args:
        create_env_fn: a callable returning an environment (gymnasium-style,
            with ``reset()`` and ``step(action)``, or a torchrl ``EnvBase``), or a
            list of them, one per environment.
        policy: the model served to every actor: batched TensorDict in, batched
            TensorDict out (with ``action``; every other output key, e.g. a
            log-prob or a recurrent state, is kept in the data).
        frames_per_batch: transitions per yielded TensorDict (the last one of a
            run is cut to ``total_frames``).
        total_frames: stop after this many frames (``-1``: iterate forever).

    Keyword Args:
        policy_factory: builds the policy instead of ``policy``.
        num_envs: number of environments when ``create_env_fn`` is one callable.
        max_batch_size, min_batch_size, server_timeout: the server's batching
            (``max_batch_size`` defaults to the number of environments).
        env_backend: ``"threading"`` (default: one actor thread per env) or
            ``"multiprocessing"`` (one child process per env, served through
            :class:`~rlserve.MPTransport`; factories must then be picklable,
            e.g. ``functools.partial(gym.make, "CartPole-v1")``). ``backend``
            and ``actor_type="thread"/"process"`` say the same.
        yield_completed_trajectories: yield one finished episode at a time
            (``frames_per_batch`` is then ignored, as in torchrl).
        postproc: applied to each batch before it is yielded (or stored).
        replay_buffer: a torchrl ``ReplayBuffer``: each batch is ``extend``-ed
            into it and iteration yields ``None``.
        exploration_type: the interaction type the policy runs under (default
            ``"random"``, as torchrl).
        weight_sync: a weight-sync scheme handed to the server; the trainer calls
            ``scheme.send(...)`` (or :meth:`update_policy_weights_`).
        server_config, device_config: torchrl's configs (``device_config.storing_device``:
            where batches are moved before they are yielded).
        policy_version, policy_version_key: the version of the initial weights,
            and the key of the per-transition version.
        post_collect_hook: called with each (post-processed) batch.
        create_env_kwargs: keyword arguments of the factories (one dict, or one per env).
        max_buffered_frames: actors pause while this many transitions wait to be
            yielded (default ``2 * frames_per_batch``): bounds memory and lag.
        seed: env ``i`` is seeded with ``seed + i`` at its first reset.
        progress: show a tqdm bar (``None``: only when stderr is a tty and
            ``total_frames`` is set).
        request_timeout: seconds an actor waits for one action (``None``: no
            limit; a dead server is still noticed within ~0.2 s).
        obs_key, action_key: keys of gymnasium-style envs' observation and action.
        server_kwargs: extra keyword arguments of the :class:`InferenceServer`.
        mp_context: start method of process actors (default ``"spawn"``).

    Accepted for torchrl compatibility without effect: ``transport`` (``"auto"``,
    ``"driver"``; an in-process or MP transport instance is used),
    ``env_exchange``, ``envs_per_worker`` (1), ``transition_chunk_size``,
    ``policy_backend``, ``reset_at_each_iter``, ``verbose``, ``worker_affinity``,
    ``driver_affinity``.
    """

    def __init__(self, create_env_fn: Any, policy: Any = None, frames_per_batch: int | None = None,
                 total_frames: int = -1, *, policy_factory: Callable[[], Any] | None = None,
                 num_envs: int | None = None, max_batch_size: int | None = None, min_batch_size: int | None = None,
                 server_timeout: float | None = None, transport: Any = None, device: Any = None,
                 backend: str | None = None, env_backend: str | None = None, env_exchange: str = "auto",
                 envs_per_worker: int = 1, transition_chunk_size: Any = "auto", policy_backend: str | None = None,
                 reset_at_each_iter: bool = False, postproc: Callable | None = None, exploration_type: Any = "random",
                 replay_buffer: Any = None, post_collect_hook: Callable | None = None,
                 yield_completed_trajectories: bool = False, weight_sync: Any = None,
                 weight_sync_model_id: str = "policy", verbose: bool = False, create_env_kwargs: Any = None,
                 worker_affinity: Any = None, driver_affinity: Any = None, server_config: Any = None,
                 device_config: Any = None, policy_version: int = 0, policy_version_key: Any = "policy_version",
                 max_buffered_frames: int | None = None, seed: int | None = None, progress: bool | None = None,
                 request_timeout: float | None = None, obs_key: str = "observation", action_key: str = "action",
                 server_kwargs: dict | None = None, actor_type: str | None = None, mp_context: str = "spawn"):
        storing = getattr(device_config, "storing_device", None) if device_config is not None else None
        if storing is not None:  # a collector setting: the server does not take it
            device_config = dataclasses.replace(device_config, storing_device=None)
        s = resolve(create_env_fn, policy=policy, policy_factory=policy_factory, frames_per_batch=frames_per_batch,
                    num_envs=num_envs, max_batch_size=max_batch_size, min_batch_size=min_batch_size,
                    server_timeout=server_timeout, transport=transport, device=device, backend=backend,
                    env_backend=env_backend, actor_type=actor_type, env_exchange=env_exchange,
                    envs_per_worker=envs_per_worker, transition_chunk_size=transition_chunk_size,
                    create_env_kwargs=create_env_kwargs, server_config=server_config, device_config=device_config,
                    server_kwargs=server_kwargs)
        self.env_backend = s.env_backend
        self.actor_type = "process" if s.env_backend == "multiprocessing" else "thread"
        self.mp_context = mp_context
        if self.actor_type == "process" and mp_context != "fork":
            _check_picklable(s.fns)
        self.create_env_fns = s.fns
        self.num_envs = len(s.fns)
        self.policy = s.policy
        self.frames_per_batch = self.requested_frames_per_batch = int(frames_per_batch)
        self.total_frames = int(total_frames)
        self.seed = seed
        self.obs_key, self.action_key = obs_key, action_key
        self.request_timeout = request_timeout
        self.progress = progress
        self.postproc = postproc
        self.replay_buffer = replay_buffer
        self.post_collect_hook = post_collect_hook
        self.yield_completed_trajectories = bool(yield_completed_trajectories)
        self.exploration_type = exploration_type
        self.reset_at_each_iter = reset_at_each_iter
        self.storing_device = storing
        self.weight_sync = weight_sync
        self.verbose = verbose
        if transport is None or isinstance(transport, str):
            if self.actor_type == "process":
                from .transports.mp import MPTransport

                transport = MPTransport(max_clients=max(64, self.num_envs))
            else:
                transport = ThreadingTransport()
        self.transport = transport
        kw = dict(s.server_kwargs)
        kw.setdefault("interaction_type", exploration_type)
        self.server = InferenceServer(self.policy, transport, weight_sync=weight_sync,
                                      weight_sync_model_id=weight_sync_model_id, policy_version=policy_version,
                                      policy_version_key=policy_version_key, **kw)
        self._cap = max(max_buffered_frames if max_buffered_frames is not None else 2 * self.frames_per_batch,
                        self.frames_per_batch)
        self._sink = Sink(self.frames_per_batch, self._cap)
        self._threads: list = []
        self._started = self._closed = False
        self._pushed_version = int(policy_version)
        self._trajs: dict = {}  # env_id -> transitions of its running episode (yield_completed_trajectories)
        self._replay_thread: threading.Thread | None = None
        self._replay_error: BaseException | None = None
        self._iterator: Iterator[Any] | None = None  # next()'s
        self._start_lock = threading.Lock()
        self._consume_lock = threading.Lock()  # iterators on several threads share one stream
        self.frames = 0  # frames yielded so far
        self.batches = 0
        self._t0: float | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> AsyncBatchedCollector:
        """Start the server and the actors (iteration does this on its own); with a
        ``replay_buffer``, also collect into it from a background thread. Returns ``self``."""
        self._start_actors()
        if self.replay_buffer is not None and self._replay_thread is None:
            self._replay_thread = threading.Thread(target=self._fill_replay, name="rlserve-replay", daemon=True)
            self._replay_thread.start()
        return self

    def _start_actors(self) -> None:
        if self._started:
            return
        with self._start_lock:  # two first iterations: one starts, the other waits for it
            if not self._started:
                self._start_actors_now()
                self._started = True

    def _start_actors_now(self) -> None:
        if self._closed:  # iterating again after shutdown starts afresh (frames counted so far are kept)
            self._closed = False
            self._sink = Sink(self.frames_per_batch, self._cap)
            self._threads = []
            self._trajs = {}
        self.server.start()
        self._t0 = time.monotonic()
        client = self.transport.client()
        if self.actor_type == "process":
            from ._proc_actor import ProcessActors

            self._threads.append(ProcessActors(
                self.create_env_fns, client, self._sink, seed=self.seed, obs_key=self.obs_key,
                action_key=self.action_key, timeout=self.request_timeout, mp_context=self.mp_context))
            return
        create_lock = threading.Lock()  # this collector's env factories run one at a time
        for i, fn in enumerate(self.create_env_fns):
            actor = EnvActor(i, fn, client, self._sink, seed=None if self.seed is None else self.seed + i,
                             obs_key=self.obs_key, action_key=self.action_key, timeout=self.request_timeout,
                             create_lock=create_lock)
            t = threading.Thread(target=actor.run, name=f"rlserve-env-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def shutdown(self, timeout: float | None = 5.0, close_env: bool = True, raise_on_error: bool = False) -> None:
        """Stop the actors, then the server. Safe to call twice; iterating again starts afresh."""
        with self._start_lock:  # a start in progress finishes first
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
            self._started = False
        timeout = 5.0 if timeout is None else timeout
        self._sink.stop()
        for t in self._threads:
            if hasattr(t, "stop"):  # process actors watch their own stop flag
                t.stop()
        self.server.shutdown(timeout)  # actors blocked on an answer get ServerClosedError at once
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        rt = self._replay_thread
        if rt is not None and rt is not threading.current_thread():
            rt.join(max(0.0, deadline - time.monotonic()))
        self._replay_thread = None
        if raise_on_error and self._replay_error is not None:
            raise RuntimeError("Background replay collection failed.") from self._replay_error

    async_shutdown = shutdown

    def __enter__(self) -> AsyncBatchedCollector:
        self._start_actors()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self):
        try:
            if self._started and not self._closed:
                self.shutdown(timeout=0.5)
        except Exception:
            pass

    def __len__(self) -> int:
        if self.total_frames <= 0:
            raise RuntimeError("Non-terminating collectors do not have a length")
        return -(self.total_frames // -self.frames_per_batch)

    def __repr__(self) -> str:
        return f"AsyncBatchedCollector(num_envs={self.num_envs}, env_backend={self.env_backend!r})"

    # -- data ------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        self._start_actors()
        bar = self._bar()
        try:
            while self.total_frames < 0 or self.frames < self.total_frames:
                td = self._next_trajectory() if self.yield_completed_trajectories else self.next_batch()
                if td is None:  # another iterator took the last frames
                    return
                if bar is not None:
                    bar.update(td.numel())
                td = self._after_batch(td)
                yield td
        finally:
            if bar is not None:
                bar.close()

    def iterator(self) -> Iterator[Any]:
        """The generator behind iteration (torchrl's name)."""
        return iter(self)

    def next(self) -> Any:
        """The next batch, or ``None`` once ``total_frames`` are collected."""
        it = self._iterator
        if it is None:
            it = self._iterator = iter(self)
        return next(it, None)

    def _after_batch(self, td: Any) -> Any:
        """postproc, then the hook, then the replay buffer (as torchrl orders them)."""
        if self.storing_device is not None:
            td = td.to(self.storing_device)
        if self.postproc is not None:
            td = self.postproc(td)
        if self.post_collect_hook is not None:
            self.post_collect_hook(td)
        if self.replay_buffer is not None:
            self.replay_buffer.extend(td)
            return None
        return td

    def _fill_replay(self) -> None:
        try:
            for _ in self:
                if self._closed:
                    return
        except BaseException as e:
            self._replay_error = e

    def _take(self, n: int, deadline: float | None, timeout: float | None) -> list:
        """Block for ``n`` transitions of the actors (the caller is the one consumer); raise the first
        actor error."""
        sink = self._sink
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
        return recs

    def next_batch(self, timeout: float | None = None) -> Any:
        """Block for the next ``frames_per_batch`` transitions (fewer for the last batch of a run;
        None once ``total_frames`` are collected). Iterators on other threads share the stream."""
        self._start_actors()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._consuming(deadline, timeout):
            n = self.frames_per_batch
            if self.total_frames >= 0:
                n = min(n, self.total_frames - self.frames)
                if n <= 0:
                    return None
            td = stack_transitions(self._take(n, deadline, timeout), self.obs_key)
            self.frames += n
            self.batches += 1
            return td

    def _next_trajectory(self, timeout: float | None = None) -> Any:
        """The next finished episode of any env (transitions of one env, in order)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        trajs = self._trajs
        with self._consuming(deadline, timeout):
            while True:
                (rec,) = self._take(1, deadline, timeout)
                env_id = rec[0]
                trajs.setdefault(env_id, []).append(rec)
                if _done(rec):
                    td = stack_transitions(trajs.pop(env_id), self.obs_key)
                    self.frames += td.numel()
                    self.batches += 1
                    return td

    @contextlib.contextmanager
    def _consuming(self, deadline: float | None, timeout: float | None) -> Iterator[None]:
        """One consumer at a time takes transitions and counts them (several iterators may run)."""
        if not self._consume_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no batch within {timeout} s (another iterator is taking one)")
        try:
            yield
        finally:
            self._consume_lock.release()

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
    def update_policy_weights_(self, policy_or_weights: Any = None, /, *, weights: Any = None, policy: Any = None,
                               worker_ids: Any = None, model_id: str | None = None, **kwargs: Any) -> int:
        """Push the trainer's weights to the served policy; returns their version.

        ``policy_or_weights`` (or ``weights=`` / ``policy=``): an ``nn.Module``,
        a state dict or a TensorDict of weights. With a ``weight_sync`` scheme it
        is sent through the scheme (nothing: the scheme sends the model given to
        its ``init_on_sender``); otherwise it goes to
        :meth:`InferenceServer.update_weights` and is applied between batches.
        """
        if model_id not in (None, "policy"):
            raise KeyError(f"Unknown AsyncBatchedCollector model_id {model_id!r}.")
        for name, value in (("weights", weights), ("policy", policy)):
            if value is not None:
                if policy_or_weights is not None:
                    raise ValueError(f"Cannot specify both positional 'policy_or_weights' and keyword '{name}'")
                policy_or_weights = value
        w = policy_or_weights
        if self.weight_sync is not None:
            from .weight_sync.foreign import is_foreign_scheme

            if is_foreign_scheme(self.weight_sync):  # torchrl's sender: send(weights=None, worker_ids=None)
                if isinstance(w, torch.nn.Module):
                    w = TensorDict.from_module(w).data
                v = self.weight_sync.send() if w is None else self.weight_sync.send(weights=w)
            elif isinstance(w, torch.nn.Module) or w is None:
                v = self.weight_sync.send(model=w)
            else:
                v = self.weight_sync.send(weights=w)
            self._pushed_version = int(v) if v is not None else self._pushed_version + 1
            return self._pushed_version
        if w is None:
            raise ValueError("update_policy_weights_() needs the trainer's weights (module or state dict) "
                             "when the collector has no weight_sync scheme")
        v = max(self._pushed_version, self.server.policy_version) + 1
        self.server.update_weights(w, version=v)
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
    def server_backend(self) -> str:
        return "thread"

    def server_stats(self, *, reset: bool = False) -> dict:
        """The server's stats (torchrl's keys and rlserve's)."""
        return self.server.stats(reset=reset)

    @property
    def episodes(self) -> list:
        """Finished episodes so far: ``(monotonic time, env_id, return, length)``."""
        return list(self._sink.episodes)

    def set_seed(self, seed: int, static_seed: bool = False) -> int:
        """Seed env ``i`` with ``seed + i`` at its first reset (envs not started yet); returns ``seed``."""
        self.seed = seed
        return seed

    def state_dict(self) -> dict:
        """Frames and batches collected so far, and the newest policy version."""
        return {"frames": self.frames, "batches": self.batches, "policy_version": self.policy_version}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue counting frames and batches from ``state_dict`` (a :meth:`state_dict`)."""
        self.frames = int(state_dict.get("frames", self.frames))
        self.batches = int(state_dict.get("batches", self.batches))

    def stats(self) -> dict:
        """Collector figures plus the server's (``"server"``)."""
        el = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        return {
            "frames": self.frames,
            "batches": self.batches,
            "frames_per_s": self.frames / el if el > 0 else 0.0,
            "episodes": len(self._sink.episodes),
            "elapsed_s": el,
            "policy_version": self.policy_version,
            "server": self.server.stats(),
        }


def _done(rec: tuple) -> bool:
    """Whether a transition record ends its episode."""
    if len(rec) == 2:
        return bool(rec[1].get(("next", "done")).any())
    _, _, _, _, term, trunc, _ = rec
    return bool(term or trunc)


def _check_picklable(fns: list) -> None:
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

