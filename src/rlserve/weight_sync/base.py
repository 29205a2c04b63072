"""The scheme lifecycle and the in-place weight copy every scheme shares."""
from __future__ import annotations

import abc
from typing import Any

import torch
from tensordict import TensorDictBase


def weights_of(model: Any) -> dict:
    """Flat ``{name: tensor}`` of a module's parameters and persistent buffers.

    The tensors are the live ones (no copy), so writing into them in place
    changes the model. A plain dict is returned as is (a layout template).
    """
    if isinstance(model, torch.nn.Module):
        return {k: v.data if isinstance(v, torch.nn.Parameter) else v for k, v in model.state_dict(keep_vars=True).items()}
    if isinstance(model, TensorDictBase):
        return dict(model.flatten_keys(".").items())
    if isinstance(model, dict):
        return model
    raise TypeError(f"expected an nn.Module or a TensorDict of weights, got {type(model).__name__}")


def flat_weights(weights: Any) -> dict:
    """``weights`` (a state dict, a TensorDict of parameters, or a module) as a flat ``{name: tensor}``
    of detached tensors (the caller's, not copies)."""
    if isinstance(weights, torch.nn.Module):
        return {k: v.detach() for k, v in weights.state_dict().items()}
    if isinstance(weights, TensorDictBase):
        return {k: v.detach() for k, v in weights.flatten_keys(".").items()}
    if isinstance(weights, dict):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    raise TypeError(f"weights must be a state dict, a TensorDict or an nn.Module, got {type(weights).__name__}")


def prepare_weights(model: Any, weights: Any) -> dict:
    """Check ``weights`` against ``model`` and return them as a flat ``{name: tensor}``.

    ``weights`` may be a state dict, a TensorDict of parameters, or a module;
    ``model`` a module, a TensorDict or a ``{name: tensor}`` template. The
    returned tensors are the caller's (detached, not copied). Raises ValueError naming every missing/unexpected key and every shape or
    dtype mismatch, so bad weights fail on the sender's side.
    """
    src = flat_weights(weights)
    live = weights_of(model)
    problems = []
    missing = sorted(set(live) - set(src))
    extra = sorted(set(src) - set(live))
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for k in live.keys() & src.keys():
        a, b = live[k], src[k]
        if not isinstance(b, torch.Tensor):
            problems.append(f"{k!r} is a {type(b).__name__}, not a tensor")
        elif a.shape != b.shape:
            problems.append(f"{k!r} has shape {list(b.shape)}, expected {list(a.shape)}")
        elif a.dtype != b.dtype:
            problems.append(f"{k!r} has dtype {b.dtype}, expected {a.dtype}")
    if problems:
        raise ValueError("weights do not match the served model: " + "; ".join(problems))
    return src


@torch.no_grad()
def copy_weights_(model: Any, weights: dict, live: dict | None = None) -> None:
    """Copy ``weights`` into the live parameters and buffers in place (storage unchanged).

    Device to device where they differ; blocking, so the source may be reused
    as soon as this returns. ``live`` is ``weights_of(model)`` when the caller
    has it cached.
    """
    if live is None:
        live = weights_of(model)
    cuda = None
    for k, dst in live.items():
        src = weights[k]
        dst.copy_(src, non_blocking=False)
        if cuda is None and (src.is_cuda or dst.is_cuda):
            cuda = src.device if src.is_cuda else dst.device
    if cuda is not None:
        # GPU copies are asynchronous: finish them before the source slot may be reused
        torch.cuda.synchronize(cuda)


def snapshot_weights(weights: dict, like: dict) -> dict:
    """Private copies of ``weights`` on the devices of ``like`` (a later in-place
    change by the caller, e.g. ``optimizer.step()``, cannot tear them)."""
    return {k: torch.empty_like(like[k]).copy_(v) for k, v in weights.items()}


class WeightSyncScheme(abc.ABC):
    """How new weights travel from a trainer to an :class:`~rlserve.InferenceServer`.

    Trainer side: ``init_on_sender(model=...)`` once, then ``send(model=...)``
    after each update. Server side: the server calls
    ``init_on_receiver(model=...)`` at start, ``receive()`` between
    batches, and ``close_receiver()`` at shutdown; ``receive`` applies the
    newest pending weights in place and returns their version, or None when
    nothing new arrived. It must never block.
    """

    def init_on_sender(self, model: Any = None, **kwargs: Any) -> None:
        self._sender_model = model

    @abc.abstractmethod
    def send(self, model: Any = None, weights: Any = None) -> int:
        """Publish new weights; returns the version they will carry."""

    def init_on_receiver(self, model: Any = None, **kwargs: Any) -> None:
        self._receiver_model = model

    @abc.abstractmethod
    def receive(self) -> int | None:
        """Apply the newest pending weights, if any; return their version or None."""

    def close_receiver(self) -> None:
        """Called by the server at shutdown: let go of the served model."""

    # torchrl's scheme lifecycle, so code written for torchrl.weight_update's schemes runs as it is
    def connect(self, *, worker_idx: int | None = None, weights: Any = None) -> None:
        """Nothing to connect: sender and receiver meet through shared state set up at init."""

    def shutdown(self) -> None:
        """Nothing to release beyond what the server's shutdown releases."""


class NoWeightSyncScheme(WeightSyncScheme):
    """Weights never change: ``send`` is a no-op and the server keeps version 0."""

    def send(self, model: Any = None, weights: Any = None, version: int | None = None) -> int:
        return 0

    def receive(self) -> None:
        return None
