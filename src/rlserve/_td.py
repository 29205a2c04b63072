"""Small tensordict helpers shared by the hot paths (tensordict >= 0.14.3)."""
from __future__ import annotations

import inspect

import torch
from tensordict import TensorDict, TensorDictBase

__all__ = ["TensorDict", "TensorDictBase", "entries", "new_td", "flat_leaves", "set_leaf"]

_new_unsafe = getattr(TensorDict, "_new_unsafe", None)
try:  # nested=False skips a per-entry dict check (tensordict >= 0.15)
    _NESTED_KW = {"nested": False} if "nested" in inspect.signature(_new_unsafe).parameters else {}
except (TypeError, ValueError):
    _NESTED_KW = {}


def new_td(source: dict, batch_size: torch.Size, device=None) -> TensorDict:
    """Build a TensorDict from a dict of tensors already known to be valid.

    ``_new_unsafe`` skips the per-entry checks of the public constructor
    (about 4x cheaper); the caller guarantees shapes agree with ``batch_size``.
    """
    if _new_unsafe is not None:
        return _new_unsafe(source, batch_size=batch_size, device=device, **_NESTED_KW)
    return TensorDict(source, batch_size=batch_size, device=device)


def entries(td: TensorDict) -> dict:
    """The key -> value storage of a plain ``TensorDict`` (no copy; read it, never write it): its
    entries without the per-call cost of ``items()``. The one place rlserve reads tensordict's
    private storage, so a tensordict release that changes it is fixed here."""
    return td._tensordict


def flat_leaves(td) -> dict | None:
    """The key -> tensor dict of a flat TensorDict of dense tensors, else None.

    Only plain ``TensorDict`` with no nested or non-tensor entries qualifies;
    everything else takes the general (tensordict stack/unbind) path.
    """
    if type(td) is not TensorDict:
        return None
    d = entries(td)
    for v in d.values():
        if type(v) is not torch.Tensor:
            return None
    return d


def set_leaf(td: TensorDictBase, key, value: torch.Tensor) -> None:
    """``td.set(key, value)``; for a plain TensorDict, a string key and a tensor already of
    its batch size and device, straight into its storage (the checked ``set`` costs ~4 us)."""
    if type(td) is TensorDict and type(key) is str and (td.device is None or value.device == td.device):
        td._tensordict[key] = value
    else:
        td.set(key, value)
