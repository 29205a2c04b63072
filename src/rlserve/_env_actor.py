"""One environment stepped by one actor thread, every action asked of an InferenceServer.

The actor appends one plain tuple per transition to a shared buffer (a deque:
append is atomic under the GIL, no lock on the fast path); the collector turns
``frames_per_batch`` of them into one TensorDict. Environments may follow the
gymnasium API (``reset() -> (obs, info)``, ``step() -> 5-tuple``) or the old gym
one (``reset() -> obs``, ``step() -> 4-tuple``).
"""
from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from ._td import TensorDict, TensorDictBase, flat_leaves, new_td
from ._torchrl_env import TorchRLEnvLoop, is_torchrl_env, stack_td_transitions
from .errors import RLServeError, ServerClosedError

__all__ = ["EnvError", "Sink", "EnvActor"]

_EMPTY = torch.Size([])
_WAIT_S = 0.2  # period of liveness checks while blocked


class EnvError(RLServeError):
    """An environment raised inside a collector; names the env and what it was doing."""

    def __init__(self, env_id: int, phase: str, exc: BaseException):
        self.env_id = env_id
        self.phase = phase
        super().__init__(f"environment {env_id} raised in {phase}: {type(exc).__name__}: {exc}")


class Sink:
    """What the actors share with the collector: the transition buffer and the first error."""

    def __init__(self, target: int, cap: int):
        self.buf: deque = deque()
        self.target = target  # wake the collector once this many transitions wait
        self.cap = cap  # actors pause while this many are buffered (backpressure)
        self.ready = threading.Event()
        self.room = threading.Condition()
        self.stopped = False
        self.error: BaseException | None = None
        self.episodes: deque = deque(maxlen=100_000)  # (time, env_id, return, length)

    def put(self, rec) -> None:
        buf = self.buf
        buf.append(rec)
        n = len(buf)
        if n >= self.target:
            self.ready.set()
            if n >= self.cap:
                with self.room:
                    while len(buf) >= self.cap and not self.stopped:
                        self.room.wait(_WAIT_S)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.ready.set()

    def stop(self) -> None:
        self.stopped = True
        self.ready.set()
        with self.room:
            self.room.notify_all()


def to_tensor(x: Any) -> Any:
    """A tensor that owns its memory (envs may reuse their observation buffers); a dict
    observation (gymnasium ``Dict`` spaces) becomes a TensorDict of them."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())  # ~3x cheaper than torch.tensor(x)
    if isinstance(x, dict):
        return TensorDict({k: to_tensor(v) for k, v in x.items()}, batch_size=_EMPTY)
    return torch.tensor(np.asarray(x))


def to_env_action(a: Any) -> Any:
    """What ``env.step`` expects: a Python scalar for a 0-d tensor, a numpy array for
    other tensors, a dict for a TensorDict (gymnasium ``Dict`` action spaces); anything
    else (non-tensor data, numpy arrays, Python values) as the policy produced it."""
    if type(a) is torch.Tensor or isinstance(a, torch.Tensor):
        if a.ndim == 0:
            return a.item()
        return (a.detach() if a.requires_grad else a).cpu().numpy()
    if isinstance(a, TensorDictBase):
        return {k: to_env_action(a[k]) for k in a.keys()}  # a[k]: non-tensor leaves unwrapped
    return a


class EnvActor:
    """Target of one actor thread: step env ``env_id`` until the sink stops."""

    def __init__(self, env_id, make_env, client, sink: Sink, *, seed=None, obs_key="observation",
                 action_key="action", timeout=None, create_lock: Any = None):
        self.env_id = env_id
        # Shared by one collector's actor threads: their env factories run one at a time (as
        # torchrl builds its envs), since building an env is often not thread-safe (torchrl's
        # GymEnv races on lazy imports when 16 threads build one each). None: no turn to wait for.
        self.create_lock = create_lock
        self.make_env = make_env
        self.client = client
        self.sink = sink
        self.seed = seed
        self.obs_key = obs_key
        self.action_key = action_key
        self.timeout = timeout
        self.env = None

    def guard(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its exception as an :class:`EnvError` naming this env and ``phase``."""
        try:
            return fn(*args)
        except Exception as e:
            raise EnvError(self.env_id, phase, e) from e

    def _reset(self, env, seed):
        phase = "reset()"
        try:
            out = env.reset(seed=seed) if seed is not None and self._seedable else env.reset()
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
                out = out[0]
            return to_tensor(out)
        except Exception as e:
            raise EnvError(self.env_id, phase, e) from e

    def _step(self, env, action):
        try:
            out = env.step(action)
            if len(out) == 5:
                obs, r, term, trunc, _ = out
            elif len(out) == 4:  # old gym API: done plus the TimeLimit hint
                obs, r, done, info = out
                trunc = bool(info.get("TimeLimit.truncated", False)) if isinstance(info, dict) else False
                term = bool(done) and not trunc
            else:
                raise TypeError(f"step() returned {len(out)} values, expected 5 (gymnasium) or 4 (gym)")
            return to_tensor(obs), float(r), bool(term), bool(trunc)
        except Exception as e:
            raise EnvError(self.env_id, f"step({action!r})", e) from e

    def run(self) -> None:
        sink = self.sink
        try:
            lock = self.create_lock
            if lock is not None:
                while not lock.acquire(timeout=_WAIT_S):  # another env of this collector is being built
                    if sink.stopped:  # stopped meanwhile (e.g. that factory hangs): build nothing
                        return
            try:
                if sink.stopped:  # stopped before this actor's turn came: build nothing
                    return
                env = self.env = self.make_env()
            except Exception as e:
                raise EnvError(self.env_id, "create_env_fn()", e) from e
            finally:
                if lock is not None:
                    lock.release()
            if is_torchrl_env(env):  # torchrl's EnvBase: its whole step TensorDict goes to the policy
                TorchRLEnvLoop(self).run(env)
                return
            for name in ("reset", "step"):
                if not callable(getattr(env, name, None)):
                    raise EnvError(self.env_id, "create_env_fn()", TypeError(
                        f"{type(env).__name__} has no {name}() method"))
            try:
                self._seedable = "seed" in inspect.signature(env.reset).parameters
            except (TypeError, ValueError):
                self._seedable = False
            self._loop(env)
        except ServerClosedError as e:  # includes ServerDeadError
            if not sink.stopped:
                sink.fail(e)
        except BaseException as e:
            if not isinstance(e, EnvError) and hasattr(e, "add_note"):
                e.add_note(f"(in the collector's actor for environment {self.env_id})")
            sink.fail(e)
        finally:
            close = getattr(self.env, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    pass

    def _loop(self, env) -> None:
        sink, client, env_id = self.sink, self.client, self.env_id
        obs_key, action_key, timeout = self.obs_key, self.action_key, self.timeout
        obs = self._reset(env, self.seed)
        ep_ret, ep_len = 0.0, 0
        while not sink.stopped:
            out = client(new_td({obs_key: obs}, _EMPTY), timeout)
            leaves = flat_leaves(out)
            row = leaves if leaves is not None else out
            nobs, r, term, trunc = self._step(env, to_env_action(out[action_key]))
            sink.put((env_id, obs, row, r, term, trunc, nobs))
            ep_ret += r
            ep_len += 1
            if term or trunc:
                sink.episodes.append((time.monotonic(), env_id, ep_ret, ep_len))
                ep_ret, ep_len = 0.0, 0
                obs = self._reset(env, None)
            else:
                obs = nobs


def stack_transitions(recs: list, obs_key: str = "observation") -> TensorDict:
    """Turn actor records into one TensorDict in torchrl's layout (``next`` holds the outcome).

    Records of torchrl envs are ``(env_id, transition TensorDict)``; those of
    gymnasium-style envs plain tuples. Each row carries ``env_index`` (torchrl's
    key) and ``env_id`` (rlserve's).
    """
    if len(recs[0]) == 2:
        return stack_td_transitions(recs)
    n = len(recs)
    bs = torch.Size([n])
    env_id, obs, rows, rew, term, trunc, nobs = zip(*recs)
    ids = torch.tensor(env_id, dtype=torch.int64)
    out = {obs_key: torch.stack(obs), "env_id": ids, "env_index": ids.clone()}
    if all(type(r) is dict for r in rows):
        keys = list(rows[0])
        if all(r.keys() == rows[0].keys() for r in rows):
            for k in keys:
                if k != obs_key:
                    out[k] = torch.stack([r[k] for r in rows])
            rows = None
    if rows is not None:  # nested or heterogeneous policy outputs: tensordict's general stack
        policy_out = torch.stack([r if not isinstance(r, dict) else TensorDict(r, _EMPTY) for r in rows])
        policy_out = policy_out.exclude(obs_key)
    terminated = torch.tensor(term, dtype=torch.bool).unsqueeze(-1)
    truncated = torch.tensor(trunc, dtype=torch.bool).unsqueeze(-1)
    false = torch.zeros(n, 1, dtype=torch.bool)
    nxt = new_td({
        obs_key: torch.stack(nobs),
        "reward": torch.tensor(rew, dtype=torch.float32).unsqueeze(-1),
        "done": terminated | truncated,
        "terminated": terminated,
        "truncated": truncated,
    }, bs)
    out.update(done=false, terminated=false.clone(), truncated=false.clone())
    td = new_td(out, bs)
    if rows is not None:
        td.update(policy_out)
    td.set("next", nxt)
    return td
