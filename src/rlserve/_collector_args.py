"""AsyncBatchedCollector's arguments: torchrl 0.14's, and rlserve's own, checked and resolved once.

torchrl's validation order and messages where torchrl validates; a clear
error where torchrl accepted something that only failed later (an empty env
list, ``frames_per_batch=0``).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Settings", "resolve"]

_ENV_BACKENDS = ("threading", "multiprocessing")
_EXCHANGES = ("queue", "shm", "auto")
_ACTOR_TYPES = {"thread": "threading", "process": "multiprocessing"}


@dataclass
class Settings:
    fns: list
    env_backend: str
    policy: Any
    server_kwargs: dict


def _env_fns(create_env_fn: Any, num_envs: int | None, create_env_kwargs: Any) -> list:
    if isinstance(create_env_fn, Sequence) and not isinstance(create_env_fn, str):
        fns = list(create_env_fn)
        if num_envs is not None and num_envs != len(fns):
            raise ValueError(f"num_envs={num_envs} but {len(fns)} create_env_fn were given")
    else:
        fns = [create_env_fn] * (num_envs if num_envs is not None else 1)
    if not fns or not all(callable(f) or _is_env(f) for f in fns):
        raise TypeError("create_env_fn must be a callable (or a non-empty list of callables) returning an env")
    if create_env_kwargs is not None:
        if isinstance(create_env_kwargs, Mapping):
            kws = [dict(create_env_kwargs)] * len(fns)
        elif (isinstance(create_env_kwargs, Sequence) and len(create_env_kwargs) == len(fns)
              and all(isinstance(k, Mapping) for k in create_env_kwargs)):
            kws = [dict(k) for k in create_env_kwargs]
        else:
            raise ValueError(f"create_env_kwargs must be a dict or a list of dicts with length {len(fns)}.")
        fns = [functools.partial(f, **kw) if kw else f for f, kw in zip(fns, kws)]
    return [f if callable(f) else _Given(f) for f in fns]


def _is_env(obj: Any) -> bool:
    """An env instance (torchrl accepts instances in place of factories, for threads)."""
    return callable(getattr(obj, "reset", None)) and callable(getattr(obj, "step", None))


class _Given:
    """A factory returning an env instance handed over as it is."""

    def __init__(self, env: Any):
        self.env = env

    def __call__(self) -> Any:
        return self.env


def resolve(
    create_env_fn: Any,
    *,
    policy: Any,
    policy_factory: Callable[[], Any] | None,
    frames_per_batch: Any,
    num_envs: int | None,
    max_batch_size: int | None,
    min_batch_size: int | None,
    server_timeout: float | None,
    transport: Any,
    device: Any,
    backend: str | None,
    env_backend: str | None,
    actor_type: str | None,
    env_exchange: str,
    envs_per_worker: Any,
    transition_chunk_size: Any,
    create_env_kwargs: Any,
    server_config: Any,
    device_config: Any,
    server_kwargs: dict | None,
) -> Settings:
    """Check the arguments (torchrl's order and messages), and resolve what the collector builds."""
    if policy is not None and policy_factory is not None:
        raise TypeError("policy and policy_factory are mutually exclusive.")
    if policy is None and policy_factory is None:
        raise TypeError("One of policy or policy_factory must be provided.")
    if server_config is not None and any(v is not None for v in (max_batch_size, min_batch_size, server_timeout)):
        raise ValueError("server_config is mutually exclusive with the max_batch_size, min_batch_size, and "
                         "server_timeout keyword arguments.")
    if device_config is not None and device is not None:
        raise ValueError("device_config is mutually exclusive with the explicit device keyword arguments (got device).")
    fns = _env_fns(create_env_fn, num_envs, create_env_kwargs)
    if isinstance(transport, str) and transport not in ("auto", "driver"):
        raise ValueError(f"transport must be an InferenceTransport, 'auto', 'driver' or None, got {transport!r}.")
    if actor_type is not None and actor_type not in _ACTOR_TYPES:
        raise ValueError(f"actor_type must be 'thread' or 'process', got {actor_type!r}")
    chosen = env_backend or backend or _ACTOR_TYPES.get(actor_type or "thread")
    if chosen not in _ENV_BACKENDS:
        raise ValueError(f"env_backend={chosen!r} is not supported. Expected one of {_ENV_BACKENDS}.")
    if env_exchange not in _EXCHANGES:
        raise ValueError(f"env_exchange={env_exchange!r} is not supported. Expected one of {_EXCHANGES}.")
    if env_exchange == "shm" and chosen != "multiprocessing":
        raise ValueError("env_exchange='shm' requires env_backend='multiprocessing'.")
    if isinstance(envs_per_worker, bool) or not isinstance(envs_per_worker, int) or envs_per_worker < 1:
        raise ValueError(f"envs_per_worker must be a positive integer, got {envs_per_worker!r}.")
    if envs_per_worker != 1 and chosen != "multiprocessing":
        raise ValueError("envs_per_worker is only supported with env_backend='multiprocessing'.")
    if transition_chunk_size != "auto" and (isinstance(transition_chunk_size, bool)
                                            or not isinstance(transition_chunk_size, int) or transition_chunk_size < 1):
        raise ValueError(f"transition_chunk_size must be a positive integer or 'auto', got {transition_chunk_size!r}.")
    if frames_per_batch is None:
        raise TypeError("AsyncBatchedCollector() missing required argument: 'frames_per_batch'")
    if isinstance(frames_per_batch, bool) or not isinstance(frames_per_batch, int) or frames_per_batch < 1:
        raise ValueError(f"frames_per_batch must be a positive integer, got {frames_per_batch!r}")
    kw: dict = {}
    if server_config is not None:
        kw["server_config"] = server_config
    else:
        kw["max_batch_size"] = max_batch_size if max_batch_size is not None else len(fns)
        if min_batch_size is not None:
            kw["min_batch_size"] = min_batch_size
        if server_timeout is not None:
            kw["timeout"] = server_timeout
    if device_config is not None:
        kw["device_config"] = device_config
    elif device is not None:
        kw["device"] = device
    kw.update(server_kwargs or {})
    return Settings(fns=fns, env_backend=chosen, policy=policy if policy is not None else policy_factory(),
                    server_kwargs=kw)
