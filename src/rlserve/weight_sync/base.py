"""The scheme lifecycle and the in-place weight copy every scheme shares."""
from __future__ import annotations

import abc

import torch
from tensordict import TensorDict, TensorDictBase


def weights_of(model) -> dict:
    """Flat ``{name: tensor}`` of a module's parameters and persistent buffers."""
    if isinstance(model, torch.nn.Module):
        return dict(model.state_dict(keep_vars=True))
    if isinstance(model, TensorDictBase):
        return dict(model.flatten_keys(".").items())
    raise TypeError(f"expected an nn.Module or a TensorDict of weights, got {type(model).__name__}")


def prepare_weights(model, weights) -> dict:
    """Check ``weights`` against ``model`` and return them as a flat ``{name: tensor}``.

    ``weights`` may be a state dict, a TensorDict of parameters, or a module.
    Raises ValueError naming every missing/unexpected key and every shape or
    dtype mismatch, so bad weights fail on the sender's side.
    """
    if isinstance(weights, torch.nn.Module):
        src = {k: v.detach() for k, v in weights.state_dict().items()}
    elif isinstance(weights, TensorDictBase):
        src = dict(weights.flatten_keys(".").items())
    elif isinstance(weights, dict):
        src = dict(weights)
    else:
        raise TypeError(f"weights must be a state dict, a TensorDict or an nn.Module, got {type(weights).__name__}")
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
def copy_weights_(model, weights: dict) -> None:
    """Copy ``weights`` into the live parameters and buffers in place (storage unchanged)."""
    live = weights_of(model)
    for k, dst in live.items():
        dst.copy_(weights[k], non_blocking=False)


class WeightSyncScheme(abc.ABC):
    """How new weights travel from a trainer to an :class:`~rlserve.InferenceServer`.

    Trainer side: ``init_on_sender(model=...)`` once, then ``send(model=...)``
    after each update. Server side: the server calls
    ``init_on_receiver(model=..., server=...)`` at start and ``receive()``
    between batches; ``receive`` applies the newest pending weights in place
    and returns their version, or None when nothing new arrived. It must
    never block.
    """

    def init_on_sender(self, model=None, **kwargs) -> None:
        self._sender_model = model

    @abc.abstractmethod
    def send(self, model=None, weights=None) -> int:
        """Publish new weights; returns the version they will carry."""

    def init_on_receiver(self, model=None, **kwargs) -> None:
        self._receiver_model = model

    @abc.abstractmethod
    def receive(self) -> int | None:
        """Apply the newest pending weights, if any; return their version or None."""
