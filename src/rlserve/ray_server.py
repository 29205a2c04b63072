"""RayInferenceServer: ``InferenceServer(policy_factory=..., service_backend="ray")``.

torchrl's Ray owner: the policy is built in a Ray actor, served there from the
moment of construction, and reached with one Ray call per request. It is
rlserve's :class:`~rlserve.RayTransport` with a policy factory (the server in
a threaded actor), behind torchrl 0.14's methods.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import ServerClosedError
from .server import InferenceServer
from .transport import InferenceClient

__all__ = ["RayInferenceServer"]

_RAY_OPTIONS = ("ray_init_config", "remote_config")
# InferenceServer arguments that travel to the server inside the actor
_SERVER_KEYS = ("max_batch_size", "static_batch_size", "min_batch_size", "timeout", "collate_fn", "device",
                "policy_device", "output_device", "collect_stats", "stats_window_size", "weight_sync",
                "weight_sync_model_id", "server_config", "device_config", "policy_version", "policy_version_key",
                "num_threads", "run_in_caller", "request_spec")


class RayInferenceServer(InferenceServer):
    """The policy and its server in a Ray actor (``service_backend="ray"``); serving once constructed."""

    def __init__(self, model: Any = None, transport: Any = None, *, policy_factory: Callable[[], Any] | None = None,
                 service_backend: Any = None, service_backend_options: dict | None = None,
                 transport_options: dict | None = None, response_spec: Any = None, num_clients: int | None = None,
                 shutdown_event: Any = None, name: str = "rlserve-server", **kwargs: Any):
        from .deploy import check_owner_arguments, check_server_arguments, check_transport_selection, torchrl_context

        if transport is None:
            transport = torchrl_context("transport") or "auto"
        check_transport_selection(transport, "ray", transport_options, kwargs.get("request_spec"), response_spec)
        opts = check_owner_arguments("ray", model, policy_factory, service_backend_options, _RAY_OPTIONS)
        unknown_kw = sorted(set(kwargs) - set(_SERVER_KEYS))
        if unknown_kw:
            raise TypeError(f"InferenceServer() got an unexpected keyword argument {unknown_kw[0]!r}")
        check_server_arguments(kwargs)
        try:
            import ray
        except ImportError:
            raise ImportError("Ray is required for service_backend='ray'.") from None
        if not ray.is_initialized():
            ray.init(**opts.get("ray_init_config", {}))
        from .transports.ray import RayTransport

        server_kwargs = dict(kwargs)
        if server_kwargs.get("server_config") is not None:
            import dataclasses

            server_kwargs["server_config"] = dataclasses.replace(server_kwargs["server_config"],
                                                                 service_backend="thread")
        topts = dict(transport_options or {})
        for k in ("backend", "timeout", "host", "port", "metadata_spec", "channel_name"):  # "distributed"'s own
            topts.pop(k, None)
        self.transport = RayTransport(policy_factory, server_kwargs=server_kwargs,
                                      actor_options=opts.get("remote_config"), **topts)
        self.policy_factory = policy_factory
        self.name = name
        self._closed = False
        self._client = None

    # -- what torchrl's Ray owner offers ---------------------------------------------------
    def _open(self) -> Any:
        if self._closed:
            raise RuntimeError("The Ray inference server is closed.")
        return self.transport

    def start(self) -> RayInferenceServer:
        """A liveness check: the Ray owner serves from construction on."""
        if not self.is_alive:
            raise RuntimeError("The Ray inference server is not alive.")
        return self

    @property
    def is_alive(self) -> bool:
        if self._closed:
            return False
        try:
            self.transport.stats(timeout=10.0)
            return True
        except Exception:
            return False

    @property
    def service_backend(self) -> str:
        return "ray"

    @property
    def transport_kind(self) -> str:
        return "ray"

    def client(self) -> InferenceClient:
        return self._open().client()

    def stats(self, *, reset: bool = False) -> dict:
        if reset:
            raise ValueError("stats(reset=True) is not offered by the Ray owner; read stats() instead")
        return self._open().stats()

    def health(self) -> dict:
        if self._closed:
            return {"is_alive": False}
        try:
            st = self.transport.stats(timeout=10.0)
            return {"is_alive": True, "policy_version": st["policy_version"], "transport": "ray"}
        except Exception as e:
            return {"is_alive": False, "error": repr(e)}

    @property
    def policy_version(self) -> int:
        return int(self._open().stats()["policy_version"])

    @policy_version.setter
    def policy_version(self, value: int) -> None:  # InferenceServer's attribute; the actor owns the real one
        pass

    def update_model_weights(self, weights: Any, *, mark_weight_update: bool = True) -> int:
        """Apply ``weights`` in the actor between batches; returns their version (the same one
        with ``mark_weight_update=False``)."""
        return self._open().update_weights(weights, mark_weight_update=mark_weight_update)

    def update_policy_weights_(self, model_id: Any = None, policy_or_weights: Any = None, **kwargs: Any) -> int:
        weights = policy_or_weights if policy_or_weights is not None else model_id
        if weights is None or isinstance(weights, str):
            raise ValueError("Policy weights must be provided.")
        return self.update_model_weights(weights)

    def update_weights(self, weights: Any, version: int | None = None, *, mark_weight_update: bool = True) -> int:
        return self._open().update_weights(weights, version, mark_weight_update=mark_weight_update)

    def update_model(self, update_fn: Any, *, mark_weight_update: bool = True) -> Any:
        raise RuntimeError("update_model runs a function on the served model, which lives in a Ray actor here; "
                           "send weights with update_model_weights(weights) instead")

    def prepare_cudagraph(self, request_spec: Any = None, *, interaction_type: Any = None) -> None:
        raise RuntimeError("A Ray inference server captures inside its actor; pass request_spec when "
                           "constructing InferenceServer.")

    def shutdown(self, timeout: float | None = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.transport.shutdown(10.0 if timeout is None else timeout)

    close = shutdown

    def __enter__(self) -> RayInferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def raise_if_not_serving(self) -> None:
        if self._closed:
            raise ServerClosedError("the Ray inference server is shut down")
