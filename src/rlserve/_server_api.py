"""The part of InferenceServer's API that torchrl 0.14 has and the serving loop does not need.

``clients(n)``, ``update_model``, ``update_policy_weights_``, ``stats(reset=)``,
``health()``, ``transport_kind``, ``service_backend`` and ``prepare_cudagraph``:
a mixin of :class:`~rlserve.InferenceServer`, kept apart so the server file
stays about serving. Nothing here runs per request.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["ServerAPI"]


class ServerAPI:
    """Mixin of :class:`~rlserve.InferenceServer` (it uses the server's lock, weights and runner)."""

    # -- clients ------------------------------------------------------------------
    def clients(self, num_clients: int) -> list:
        """``num_clients`` new clients of this server's transport."""
        from .deploy import check_num_clients

        return [self.client() for _ in range(check_num_clients(num_clients))]

    # -- what serves -------------------------------------------------------------
    @property
    def service_backend(self) -> str:
        """Where inference runs: ``"thread"`` (a thread of this process)."""
        return "thread"

    @property
    def transport_kind(self) -> str:
        """torchrl's name for the transport: ``"thread"``, ``"process"``, ``"ray"``, ``"direct"``, ..."""
        from .deploy import transport_kind

        return transport_kind(self.transport)

    def health(self) -> dict:
        """``{"is_alive", "policy_version", "transport"}``, plus ``"died"`` (repr) after a crash; never raises."""
        out = {"is_alive": self.is_alive, "policy_version": self.policy_version, "transport": self.transport_kind}
        if self._died is not None:
            out["died"] = repr(self._died)
        return out

    def stats(self, *, reset: bool = False) -> dict:
        """Counters and latency percentiles (rlserve's keys and torchrl's); ``reset`` clears them after reading."""
        out = self._stats.snapshot(self.policy_version)
        if reset:
            self._stats.reset()
        return out

    # -- weights -----------------------------------------------------------------
    def update_model(self, update_fn: Callable[[Any], Any], *, mark_weight_update: bool = True) -> Any:
        """Run ``update_fn(model)`` between batches (under the serve lock); returns what it returns.

        With ``mark_weight_update`` (default) the version goes up by one once it
        returns; if it raises, the version stays and the error propagates.
        """
        with self._serve_lock:
            out = update_fn(self.model)
            if mark_weight_update:
                self.policy_version += 1
                self._stats.weight_updates += 1
        return out

    def update_policy_weights_(self, model_id: Any = None, policy_or_weights: Any = None, **kwargs: Any) -> int:
        """Apply ``policy_or_weights`` (a module, a TensorDict of parameters, a state dict) between
        batches and return their version; with no weights, only mark an update (version + 1).

        (torchrl's thread server only bumps the version, whatever it is given.)
        """
        weights = policy_or_weights if policy_or_weights is not None else kwargs.get("weights", kwargs.get("policy"))
        if weights is None:
            return self.update_model(lambda _m: None)
        return self.update_weights(weights)

    # -- static batches and CUDA graphs --------------------------------------------
    def _wants_cudagraph(self) -> bool:
        d = self.policy_device
        return d is not None and d.type == "cuda"

    def prepare_cudagraph(self, request_spec: Any = None, *, interaction_type: Any = None) -> None:
        """Capture the model as a CUDA graph for batches of ``static_batch_size`` rows.

        A no-op without ``static_batch_size``. Needs a CUDA ``policy_device``
        and a request layout (``request_spec`` here or at construction); on a
        machine without CUDA it says so. Without a graph, ``static_batch_size``
        still pads every batch to that size.
        """
        if self.static_batch_size is None:
            return
        if self.is_alive:
            raise RuntimeError("The CUDA graph must be prepared before server start.")
        if not torch.cuda.is_available():
            raise RuntimeError(
                "prepare_cudagraph() captures a CUDA graph and needs a CUDA device, and none is present "
                "(torch.cuda.is_available() is False); static_batch_size alone pads batches on any device")
        if not self._wants_cudagraph():
            raise ValueError("static_batch_size requires an explicit CUDA policy_device.")
        spec = request_spec if request_spec is not None else self.request_spec
        if spec is None:
            raise RuntimeError(
                "static_batch_size requires request_spec so the CUDA graph can be captured before the serve loop starts.")
        from tensordict.nn import CudaGraphModule, set_interaction_type

        batch = torch.stack([spec.clone() for _ in range(self.static_batch_size)]).to(self.policy_device)
        graph = CudaGraphModule(self.model, warmup=2, device=self.policy_device)
        with torch.no_grad(), set_interaction_type(interaction_type):
            for _ in range(3):  # warm-up runs, then the capture
                graph(batch.clone())
        self._runner.graph = graph
