"""The caller's exploration mode (tensordict's interaction type), carried with each request.

A request runs under the interaction type its caller had when it submitted it
(``tensordict.nn.interaction_type()``, or a :class:`~rlserve.PolicyClientModule`'s
own), never under whatever the server thread happens to see: a learner
evaluating deterministically does not make the served actors deterministic.

How it travels: a request submitted under an interaction type carries it as
one int8 entry, ``MARKER`` (torchrl's key and codes), added to a shallow copy
of the request (the caller's TensorDict is never changed); a request with no
marker means "no interaction type". It travels like any entry, so every
transport carries it. The server groups requests by it (requests of different
types never share a forward), removes it before the forward, and runs each
group under its type. Callers with no interaction type set (the usual case)
pay one function call per request and nothing else.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from tensordict.nn import InteractionType, set_interaction_type
from tensordict.nn.probabilistic import interaction_type  # not re-exported by tensordict.nn before 0.15

from ._td import TensorDict, TensorDictBase, entries

__all__ = [
    "MARKER", "code_of", "mode_of", "caller_code", "stamp", "with_caller_mode", "request_code", "running_as",
    "interaction_type",
]

MARKER = "_torchrl_inference_interaction_type"
_CODES = {
    InteractionType.MODE: 0,
    InteractionType.MEDIAN: 1,
    InteractionType.MEAN: 2,
    InteractionType.RANDOM: 3,
    InteractionType.DETERMINISTIC: 4,
}
_MODES = {c: m for m, c in _CODES.items()}
try:  # tensordict >= 0.15: a per-thread interaction type (the server must not change other threads')
    _THREAD_LOCAL = "thread_local" in inspect.signature(set_interaction_type.__init__).parameters
except (TypeError, ValueError):  # pragma: no cover
    _THREAD_LOCAL = False


def code_of(mode: InteractionType | str | None) -> int | None:
    """The wire code of an interaction type (None: no interaction type)."""
    if mode is None:
        return None
    return _CODES[InteractionType(mode.lower() if isinstance(mode, str) else mode)]


def mode_of(code: int | None) -> InteractionType | None:
    """The interaction type of a wire code (-1 or None: none)."""
    if code is None or code < 0:
        return None
    try:
        return _MODES[code]
    except KeyError:
        from .errors import RequestError

        raise RequestError(f"unknown interaction-type code {code} in {MARKER!r}") from None


def caller_code() -> int | None:
    """The calling thread's interaction type, as a code (None when it has none)."""
    mode = interaction_type()
    return None if mode is None else _CODES[mode]


def stamp(td: TensorDictBase, code: int) -> TensorDictBase:
    """A shallow copy of ``td`` carrying ``code`` (the caller's TensorDict is left as it is)."""
    out = td.copy()
    out.set(MARKER, torch.full(td.batch_size, code, dtype=torch.int8))
    return out


def with_caller_mode(td: Any) -> Any:
    """``td``, stamped with the caller's interaction type when it has one and ``td`` carries none yet."""
    code = caller_code()
    if code is None or not isinstance(td, TensorDictBase):
        return td
    if type(td) is TensorDict:
        if MARKER in entries(td):  # already stamped (a PolicyClientModule's own type wins)
            return td
    elif MARKER in td.keys():
        return td
    return stamp(td, code)


def request_code(marker: Any) -> int | None:
    """The code a request's marker entry carries (one value for the whole request)."""
    if not isinstance(marker, torch.Tensor):
        return int(marker) if marker is not None else None
    if marker.numel() == 0:
        return None
    return int(marker.reshape(-1)[0])


@contextlib.contextmanager
def running_as(code: int | None) -> Iterator[None]:
    """Run the block under the interaction type of ``code``, on this thread only where
    tensordict allows (>= 0.15; before, the process-wide type, as torchrl does)."""
    want = mode_of(code)
    if interaction_type() is want:
        yield
        return
    ctx = set_interaction_type(want, thread_local=True) if _THREAD_LOCAL else set_interaction_type(want)
    with ctx:
        yield
