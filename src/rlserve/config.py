"""torchrl-shaped configuration: ``InferenceServerConfig``, ``InferenceDeviceConfig`` and their rules.

The dataclasses, defaults, validation and error messages are torchrl 0.14's
(``torchrl.modules.inference_server``), so code written for it runs as it is.
:func:`resolve_batching` and :func:`resolve_devices` turn the loose keyword
arguments plus an optional config into the plain values the core server takes;
they run before anything starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "InferenceServerConfig",
    "InferenceDeviceConfig",
    "Batching",
    "Devices",
    "resolve_batching",
    "resolve_devices",
    "check_static_batch_size",
]

_SERVICE_BACKENDS = ("thread", "process", "ray")
_DEFAULT_STATS_WINDOW = 1024


def check_static_batch_size(static_batch_size: Any, max_batch_size: int) -> None:
    """torchrl's checks of ``static_batch_size`` (the CUDA requirement is checked where graphs are captured)."""
    if static_batch_size is None:
        return
    if isinstance(static_batch_size, bool) or not isinstance(static_batch_size, int):
        raise TypeError("static_batch_size must be an integer or None.")
    if static_batch_size < max_batch_size:
        raise ValueError(
            f"static_batch_size must be at least max_batch_size, got {static_batch_size} and {max_batch_size}.")


@dataclass
class InferenceServerConfig:
    """Batching and service settings of an :class:`~rlserve.InferenceServer` (torchrl's config).

    Args:
        service_backend: where inference runs: ``"thread"``, ``"process"`` or ``"ray"``.
        max_batch_size: most requests per forward.
        static_batch_size: pad every batch to this size (CUDA-graph capture on a
            CUDA ``policy_device``); at least ``max_batch_size``.
        min_batch_size: run once this many requests are pending...
        timeout: ...or once the oldest has waited this long (seconds).
        collect_stats: record batch sizes and latencies for :meth:`~rlserve.InferenceServer.stats`.
        stats_window_size: samples kept per latency window.
        max_inflight_per_env: used by :class:`~rlserve.AsyncBatchedCollector` only.
    """

    service_backend: Literal["thread", "process", "ray"] = "thread"
    max_batch_size: int = 64
    static_batch_size: int | None = None
    min_batch_size: int = 1
    timeout: float = 0.01
    collect_stats: bool = True
    stats_window_size: int = _DEFAULT_STATS_WINDOW
    max_inflight_per_env: int | None = None

    def __post_init__(self) -> None:
        if self.service_backend not in _SERVICE_BACKENDS:
            raise ValueError(
                f"service_backend={self.service_backend!r} is not supported. Expected 'thread', 'process', or 'ray'.")
        check_static_batch_size(self.static_batch_size, self.max_batch_size)
        if self.max_inflight_per_env is not None and self.max_inflight_per_env < 1:
            raise ValueError(
                f"max_inflight_per_env must be at least 1 (got {self.max_inflight_per_env}); "
                "use None to disable the guard.")


def _device(value: Any) -> torch.device | None:
    return None if value is None else torch.device(value)


@dataclass
class InferenceDeviceConfig:
    """Where the policy runs and where answers go (torchrl's config).

    Args:
        policy_device: the device that holds the policy and receives batches.
        output_device: where answers are moved before they are returned.
        env_device: the environments' device; the fallback for ``output_device``.
        storing_device: a collector setting (the server refuses it).
    """

    policy_device: torch.device | str | None = None
    output_device: torch.device | str | None = None
    env_device: torch.device | str | None = None
    storing_device: torch.device | str | None = None

    def __post_init__(self) -> None:
        self.policy_device = _device(self.policy_device)
        self.output_device = _device(self.output_device)
        self.env_device = _device(self.env_device)
        self.storing_device = _device(self.storing_device)

    def server_output_device(self) -> torch.device | None:
        """``output_device``, else ``env_device``."""
        return self.output_device if self.output_device is not None else self.env_device


@dataclass
class Batching:
    """Resolved batching settings."""

    max_batch_size: int
    static_batch_size: int | None
    min_batch_size: int
    timeout: float
    collect_stats: bool
    stats_window_size: int


@dataclass
class Devices:
    """Resolved device settings."""

    policy_device: torch.device | None = None
    output_device: torch.device | None = None
    env_device: torch.device | None = field(default=None)


def resolve_batching(
    server_config: InferenceServerConfig | None,
    *,
    max_batch_size: int | None = None,
    static_batch_size: int | None = None,
    min_batch_size: int | None = None,
    timeout: float | None = None,
    collect_stats: bool | None = None,
    stats_window_size: int | None = None,
) -> Batching:
    """Loose keyword arguments, or a config (never both), with torchrl's defaults for what is unset."""
    loose = (max_batch_size, static_batch_size, min_batch_size, timeout, collect_stats, stats_window_size)
    if server_config is not None and any(v is not None for v in loose):
        raise ValueError(
            "server_config is mutually exclusive with the max_batch_size, static_batch_size, min_batch_size, "
            "timeout, collect_stats, and stats_window_size keyword arguments.")
    base = server_config if server_config is not None else InferenceServerConfig()
    out = Batching(
        max_batch_size=base.max_batch_size if max_batch_size is None else max_batch_size,
        static_batch_size=base.static_batch_size if static_batch_size is None else static_batch_size,
        min_batch_size=base.min_batch_size if min_batch_size is None else min_batch_size,
        timeout=base.timeout if timeout is None else timeout,
        collect_stats=base.collect_stats if collect_stats is None else bool(collect_stats),
        stats_window_size=base.stats_window_size if stats_window_size is None else stats_window_size,
    )
    check_static_batch_size(out.static_batch_size, out.max_batch_size)
    return out


def resolve_devices(
    device_config: InferenceDeviceConfig | None,
    *,
    device: Any = None,
    policy_device: Any = None,
    output_device: Any = None,
    allow_storing_device: bool = False,
) -> Devices:
    """``policy_device`` (else ``device``) and ``output_device`` (else ``env_device``), from a config or loose."""
    if device_config is not None:
        given = [n for n, v in (("device", device), ("policy_device", policy_device),
                                ("output_device", output_device)) if v is not None]
        if given:
            raise ValueError(
                "device_config is mutually exclusive with the explicit device keyword arguments "
                f"(got {', '.join(given)}).")
        if device_config.storing_device is not None and not allow_storing_device:
            raise ValueError(
                "storing_device is a collector-level setting that the server does not consume. The server only "
                "uses policy_device and output_device (with env_device as a fallback for output_device). "
                "Pass storing_device to the collector instead.")
        return Devices(
            policy_device=device_config.policy_device,
            output_device=device_config.server_output_device(),
            env_device=device_config.env_device,
        )
    pd = policy_device if policy_device is not None else device
    return Devices(policy_device=_device(pd), output_device=_device(output_device))
