"""Short, exact errors for requests the model could not run.

When a model raises the kind of error a wrong key, shape or dtype makes
(``KeyError``, ``RuntimeError``...) on a request whose layout it never ran
while it did run another, the caller gets a :class:`~rlserve.RequestError`
naming the difference, restricted to what the model reads (its ``in_keys``
when it declares them), and short whatever the request's size.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import RequestError

__all__ = ["explain_failure", "model_reads"]

_LAYOUT_ERRORS = (KeyError, RuntimeError, TypeError, ValueError, IndexError)
_MAX_KEYS = 5  # keys named per list; the rest are counted
_MAX_CAUSE = 200  # characters of the model's own message


def model_reads(model: Any) -> list | None:
    """The keys a TensorDictModule reads (its ``in_keys``), or None when it does not say."""
    from tensordict.nn import TensorDictModuleBase

    if not isinstance(model, TensorDictModuleBase):
        return None
    try:
        return [_norm(k) for k in model.in_keys]
    except Exception:  # a module whose in_keys cannot be listed
        return None


def explain_failure(accepted: dict, sig: tuple, e: Exception, reads: Sequence | None = None) -> Exception:
    """The model's own error, or a RequestError when an unseen request layout caused it.

    ``accepted``: signatures the model ran, newest last; ``reads``: the keys
    the model reads, when known. The original error stays as ``__cause__``.
    """
    if type(e) not in _LAYOUT_ERRORS or not accepted or sig in accepted:
        return e
    good = _reference(accepted, reads)
    cause = f"{type(e).__name__}: {e}"
    if len(cause) > _MAX_CAUSE:
        cause = cause[:_MAX_CAUSE] + "..."
    what = f"the model reads {_names(list(reads))}; " if reads else ""
    err = RequestError(
        f"the model failed on a request whose layout differs from what it accepts "
        f"({what}{_diff(good, sig, reads)}): {cause}")
    err.__cause__ = e
    return err


def _norm(key: Any) -> Any:
    return key[0] if isinstance(key, tuple) and len(key) == 1 else key


def _reference(accepted: dict, reads: Sequence | None) -> tuple:
    """The newest accepted layout that has every key the model reads (else the newest)."""
    for sig in reversed(list(accepted)):
        if not reads or all(k in {leaf[0] for leaf in sig[3]} for k in reads):
            return sig
    return next(reversed(accepted))


def _names(keys: list) -> str:
    if len(keys) <= _MAX_KEYS:
        return repr(keys)
    return f"{keys[:_MAX_KEYS]!r} and {len(keys) - _MAX_KEYS} more"


def _diff(good: tuple, bad: tuple, reads: Sequence | None) -> str:
    g = {leaf[0]: leaf for leaf in good[3]}
    b = {leaf[0]: leaf for leaf in bad[3]}
    keys = list(reads) if reads else list(g)
    parts = []
    missing = [k for k in keys if k not in b]
    if missing:
        parts.append(f"missing keys {_names(missing)}")
    if not reads:
        extra = [k for k in b if k not in g]
        if extra:
            parts.append(f"unexpected keys {_names(extra)}")
    differ = [k for k in keys if k in b and k in g and g[k] != b[k]]
    for k in differ[:_MAX_KEYS]:
        parts.append(f"{k!r} is {_leaf(b[k])}, expected {_leaf(g[k])}")
    if len(differ) > _MAX_KEYS:
        parts.append(f"and {len(differ) - _MAX_KEYS} more keys differ")
    if good[1] != bad[1]:
        parts.append(f"batch_size {list(bad[1])}, expected {list(good[1])}")
    return "; ".join(parts) or f"batch_size={list(bad[1])}, {len(bad[3])} leaves"


def _leaf(leaf: tuple) -> str:
    if len(leaf) == 4:
        return f"shape={list(leaf[1])} dtype={leaf[2]}"
    return leaf[1]
