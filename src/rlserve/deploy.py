"""torchrl-shaped deployment arguments, resolved into rlserve's core objects before anything starts.

``InferenceServer(model, transport="auto", service_backend=..., ...)`` takes
torchrl 0.14's arguments; this module turns them into a transport object and
a choice of owner (a server thread here, a process of its own, a Ray actor),
with torchrl's validation order and messages. Nothing here runs per request.
"""
from __future__ import annotations

from typing import Any

import sys

from .transport import InferenceTransport, as_transport

__all__ = ["SERVICE_BACKENDS", "resolve_service_backend", "make_transport", "transport_kind", "check_num_clients"]

SERVICE_BACKENDS = ("thread", "process", "ray")
_ALIASES = {"threading": "thread", "multiprocessing": "process"}
_KNOWN = sorted(["direct", "distributed", "monarch", "multiprocessing", "process", "ray", "rpc", "submitit",
                 "thread", "threading"])
# transport strings each owner accepts ("auto" picks the first)
_SELECTORS = {
    "thread": ("auto", "thread", "queue", "direct"),
    "process": ("auto", "process", "process_slot", "shared_memory", "distributed"),
    "ray": ("auto", "ray", "distributed"),
}


def torchrl_context(kind: str) -> str | None:
    """The backend a ``torchrl.service_backend(...)`` / ``torchrl.transport_backend(...)`` block sets,
    when torchrl is already imported (rlserve never imports it)."""
    # torchrl 0.14 offers no public getter for these blocks: this is the one place rlserve reads
    # torchrl's internals (tests/test_torchrl_parity.py checks it against the real torchrl)
    backends = sys.modules.get("torchrl._comm.backends")
    getter = getattr(backends, f"_get_{kind}_backend", None) if backends is not None else None
    try:
        return getter() if getter is not None else None
    except Exception:  # another torchrl version: no context then
        return None


def with_context(message: str, service: bool = False, transport: bool = False) -> str:
    """torchrl's note on an error caused by an enclosing backend block."""
    names = [n for n, on in (("torchrl.service_backend", service), ("torchrl.transport_backend", transport)) if on]
    return message if not names else f"{message} (selected by an enclosing {' and '.join(names)} context.)"


def service_from_context(service_backend: str | None, server_config: Any = None) -> bool:
    """Whether the service backend comes from an enclosing ``torchrl.service_backend(...)`` block."""
    return service_backend is None and server_config is None and torchrl_context("service") is not None


def resolve_service_backend(service_backend: str | None, server_config: Any = None) -> str:
    """``"thread"``, ``"process"`` or ``"ray"`` from the argument, the config, or an enclosing
    ``torchrl.service_backend(...)`` block (torchrl's rules)."""
    configured = server_config.service_backend if server_config is not None else "thread"
    from_context = service_from_context(service_backend, server_config)
    if from_context:
        service_backend = torchrl_context("service")
    if service_backend is None:
        return configured
    backend = _ALIASES.get(service_backend, service_backend)
    if backend not in _KNOWN:
        raise ValueError(f"Unsupported service backend {service_backend!r}. Expected one of {_KNOWN}.")
    if server_config is not None and configured not in ("thread", backend):
        raise ValueError("service_backend conflicts with server_config.service_backend.")
    if backend not in SERVICE_BACKENDS:
        raise ValueError(with_context("InferenceServer service_backend must be 'thread', 'process', or 'ray'.",
                                      service=from_context))
    return backend


def check_transport_selection(
    transport: Any,
    service_backend: str,
    transport_options: dict | None,
    request_spec: Any,
    response_spec: Any,
) -> None:
    """torchrl's checks of a transport selector against its owner and options."""
    if not isinstance(transport, str):
        if transport_options:
            raise ValueError("transport_options cannot be used with an explicit transport instance.")
    elif transport not in _SELECTORS[service_backend]:
        raise ValueError(f"transport={transport!r} is incompatible with service_backend={service_backend!r}.")
    if response_spec is not None and request_spec is None:
        raise ValueError("response_spec requires request_spec.")
    if transport in ("shared_memory", "process_slot") and (request_spec is None or response_spec is None):
        raise ValueError(f"transport={transport!r} requires request_spec and response_spec.")
    if transport == "distributed" and service_backend == "process" and (request_spec is None or response_spec is None):
        raise ValueError("Process-owned distributed inference requires request_spec and response_spec.")


def make_transport(
    transport: Any,
    service_backend: str = "thread",
    *,
    transport_options: dict | None = None,
    request_spec: Any = None,
    response_spec: Any = None,
    num_clients: int | None = None,
    service_in_context: bool = False,
) -> InferenceTransport:
    """The transport for a selector string (``"auto"``, ``"thread"``, ``"process"``, ...) or an instance.

    ``service_in_context``: the service backend came from a ``torchrl.service_backend`` block
    (errors say so, as torchrl's do)."""
    transport_in_context = False
    if transport is None:  # not given: an enclosing torchrl.transport_backend(...) block, else "auto"
        transport = torchrl_context("transport")
        transport_in_context = transport is not None
        transport = transport or "auto"
    try:
        check_transport_selection(transport, service_backend, transport_options, request_spec, response_spec)
    except ValueError as e:
        if not (service_in_context or transport_in_context):
            raise
        raise ValueError(with_context(str(e), service_in_context, transport_in_context)) from None
    if not isinstance(transport, str):
        return as_transport(transport)
    opts = dict(transport_options or {})
    if transport == "distributed":
        # torch.distributed tensor channels: rlserve's own transport for this owner moves tensors without
        # pickling already (shared-memory slots, raw bytes over Ray), so it serves this selector.
        for k in ("backend", "timeout", "host", "port", "metadata_spec", "channel_name"):
            opts.pop(k, None)
        if service_backend == "process":
            from .transports.mp import MPTransport

            return MPTransport(request_example=request_spec, response_example=response_spec, **opts)
        transport = service_backend
    if transport == "auto":
        transport = service_backend
    if transport in ("thread", "queue"):
        from .transports.threading import ThreadingTransport

        return ThreadingTransport(**opts)
    if transport == "direct":
        if num_clients is None:
            raise ValueError("transport='direct' requires num_clients.")
        from .transports.slots import SlotTransport

        return SlotTransport(num_clients, **opts)
    if transport == "process":
        from .transports.mp import MPTransport

        return MPTransport(**opts)
    if transport in ("shared_memory", "process_slot"):
        from .transports.slots import ProcessSlotTransport, SharedMemoryTransport

        opts.setdefault("num_slots", num_clients or 1)
        cls = SharedMemoryTransport if transport == "shared_memory" else ProcessSlotTransport
        return cls(request_spec, response_spec, **opts)
    from .transports.ray import RayTransport

    return RayTransport(**opts)


def transport_kind(transport: Any) -> str:
    """torchrl's name for a transport's kind (``"thread"``, ``"process"``, ``"ray"``, ...)."""
    import sys

    from .transports.threading import ThreadingTransport

    names = [  # most derived first
        (".transports.slots", "ProcessSlotTransport", "process_slot"),
        (".transports.slots", "SharedMemoryTransport", "shared_memory"),
        (".transports.slots", "SlotTransport", "direct"),
        (".transports.ray", "RayTransport", "ray"),
        (".transports.monarch", "MonarchTransport", "monarch"),
        (".transports.mp", "MPTransport", "process"),
    ]
    for mod, cls, kind in names:
        module = sys.modules.get(__package__ + mod)  # never import an engine just to name a transport
        if module is not None and isinstance(transport, getattr(module, cls)):
            return kind
    if isinstance(transport, ThreadingTransport):
        return "thread"
    return "custom"


def check_owner_arguments(backend: str, model: Any, policy_factory: Any, service_backend_options: dict | None,
                          allowed_options: tuple) -> dict:
    """torchrl's checks for a process or Ray owner (the policy built where it is served); returns
    the owner's options."""
    where = "in the child process" if backend == "process" else "on the Ray actor"
    if model is not None:
        raise ValueError(f"service_backend={backend!r} requires policy_factory so the policy is constructed {where}.")
    if policy_factory is None:
        raise ValueError(f"policy_factory is required for service_backend={backend!r}.")
    opts = dict(service_backend_options or {})
    unknown = sorted(set(opts) - set(allowed_options))
    if unknown:
        name = "process" if backend == "process" else "Ray"
        raise ValueError(f"Unsupported {name} service_backend_options: {unknown}.")
    return opts


def check_server_arguments(server_kwargs: dict) -> None:
    """The batching and device arguments of a server that is built elsewhere (a child process, a
    Ray actor), checked here so a mistake raises in the caller, before anything starts."""
    from .config import resolve_batching, resolve_devices

    batching_keys = ("max_batch_size", "static_batch_size", "min_batch_size", "timeout", "collect_stats",
                     "stats_window_size")
    resolve_batching(server_kwargs.get("server_config"), **{k: server_kwargs.get(k) for k in batching_keys})
    resolve_devices(server_kwargs.get("device_config"), device=server_kwargs.get("device"),
                    policy_device=server_kwargs.get("policy_device"), output_device=server_kwargs.get("output_device"))


def check_num_clients(num_clients: Any) -> int:
    """torchrl's checks of ``clients(n)``."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int):
        raise TypeError("num_clients must be an integer.")
    if num_clients < 1:
        raise ValueError("num_clients must be at least 1.")
    return num_clients
