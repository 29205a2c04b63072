"""Weight-sync schemes written for torchrl's receiver protocol, served with rlserve's guarantees.

torchrl's protocol, as its inference server uses it: ``init_on_receiver(
model_id=..., model=..., worker_idx=0)`` and ``connect(worker_idx=0)`` once,
then ``receive(timeout=0.0)`` between batches, which applies new weights to the
model it was given and returns them (or None); some schemes (torchrl's
shared-memory and multiprocess ones) apply weights from a thread of their own
and then call ``context.update_policy_weights_(...)``.

Served as they are, such schemes write into the live model whenever they like
(torn weights mid-forward, versions that name no weights). So rlserve hands
them a *staging copy* of the model, and only the server, between batches and
under its serve lock, copies the staging weights into the live model and
bumps the version. Recognised by duck typing: nothing here imports torchrl.
"""
from __future__ import annotations

import copy
import inspect
import logging
import threading
from typing import Any

import torch

from .base import copy_weights_, prepare_weights, weights_of

__all__ = ["ForeignScheme", "as_receiver", "is_foreign_scheme"]

log = logging.getLogger("rlserve")


def is_foreign_scheme(scheme: Any) -> bool:
    """True for an object following torchrl's receiver protocol (not an rlserve scheme)."""
    from .base import WeightSyncScheme

    return not isinstance(scheme, WeightSyncScheme) and callable(getattr(scheme, "receive", None)) \
        and callable(getattr(scheme, "init_on_receiver", None))


def _receives_in_background(scheme: Any) -> bool:
    """torchrl's shared-memory schemes (and their multiprocess subclass) apply weights from their own
    thread and announce them through ``context.update_policy_weights_``; their ``receive()`` is not
    for polling (torchrl's server never calls it: it returns the shared weights every time, or waits
    on a queue). Recognised by torchrl's class, as torchrl itself does, without importing torchrl."""
    return any(c.__name__ == "SharedMemWeightSyncScheme" and c.__module__.startswith("torchrl.")
               for c in type(scheme).__mro__)


def _call(fn: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (``worker_idx`` is torchrl's, not every scheme's)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


class ForeignScheme:
    """The receiver side of a torchrl-protocol scheme, as the server uses an rlserve scheme.

    ``receive()`` (server thread, between batches, serve lock held) returns the
    version of new weights it copied into the live model, else None.
    """

    def __init__(self, scheme: Any, model_id: str = "policy", current_version: Any = None):
        self.scheme = scheme
        self.model_id = model_id
        self._current_version = current_version or (lambda: self.version)
        self._live = None
        self._staging = None
        self._fresh = 0  # sets the scheme announced through context.update_policy_weights_
        self._taken = 0
        self._lock = threading.Lock()
        self._background = _receives_in_background(scheme)
        self.version = 0

    # the scheme calls this (as its "context") after writing weights into the staging copy
    def update_policy_weights_(self, model_id: Any = None, policy_or_weights: Any = None, **kwargs: Any) -> None:
        with self._lock:
            self._fresh += 1

    def init_on_receiver(self, model: Any = None, **kwargs: Any) -> None:
        """Wire the scheme to a staging copy of ``model`` (never to the live one)."""
        self._live = model
        s = self.scheme
        if self._staging is None:
            self._staging = copy.deepcopy(model) if isinstance(model, torch.nn.Module) else model
        if hasattr(s, "context"):
            try:
                s.context = self  # so a background receiver's cascade reaches us, not a model
            except Exception:  # a read-only context: the scheme's receive() return value still tells
                pass
        if not getattr(s, "initialized_on_receiver", False):
            _call(s.init_on_receiver, model_id=self.model_id, model=self._staging, worker_idx=0)
        if not getattr(s, "synchronized_on_receiver", False) and callable(getattr(s, "connect", None)):
            _call(s.connect, worker_idx=0)

    def receive(self) -> int | None:
        got = None if self._background else self.scheme.receive(timeout=0.0)
        with self._lock:
            fresh, self._taken = self._fresh > self._taken, self._fresh
        if got is None and not fresh:
            return None
        if isinstance(got, (dict, torch.nn.Module)) or hasattr(got, "flatten_keys"):
            copy_weights_(self._live, prepare_weights(self._live, got))
        else:
            copy_weights_(self._live, weights_of(self._staging))
        self.version = self._current_version() + 1
        return self.version

    def close_receiver(self) -> None:
        """Nothing to release on our side; torchrl's server does not shut schemes down either."""


def as_receiver(scheme: Any, model_id: str = "policy", current_version: Any = None) -> Any:
    """``scheme`` itself (an rlserve scheme) or a :class:`ForeignScheme` around a torchrl-protocol one;
    ``current_version()``: the server's version (a foreign scheme's new set is one past it)."""
    if scheme is None or not is_foreign_scheme(scheme):
        return scheme
    return ForeignScheme(scheme, model_id, current_version)
