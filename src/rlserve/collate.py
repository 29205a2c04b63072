"""The hot path: group requests by signature, stack them, split outputs into rows.

A *signature* is what must agree for requests to be stacked together: batch
size, keys, each leaf's shape, dtype and device, and the caller's interaction
type (``interaction.py``). Requests with different signatures go to different
groups (and forward passes) so one odd request never breaks its neighbours.
"""
from __future__ import annotations

from typing import Any

import torch

from ._td import TensorDictBase, entries, flat_leaves, new_td
from .errors import RequestError
from .interaction import MARKER, request_code

__all__ = [
    "group_by_signature", "stack_group", "stack_leaves", "batched_output", "split_rows", "split_leaves",
    "signature_device", "is_fast",
]

_FAST = "fast"
_GENERAL = "general"


def signature(td: Any) -> tuple:
    """Hashable signature of one request: ``(kind, batch size, device, leaves, interaction code)``;
    raises RequestError if it has none."""
    d = flat_leaves(td)
    if d is not None:
        m = d.get(MARKER)
        return (_FAST, td.batch_size, td.device, tuple([(k, v.shape, v.dtype, v.device) for k, v in d.items()]),
                None if m is None else request_code(m))
    if not isinstance(td, TensorDictBase):
        raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
    leaves = []
    for k, v in td.items(include_nested=True, leaves_only=True):
        if isinstance(v, torch.Tensor):
            leaves.append((k, v.shape, v.dtype, v.device))
        else:  # non-tensor data: stackable as long as the key set agrees
            leaves.append((k, type(v).__name__))
    m = td.get(MARKER, None)
    return (_GENERAL, td.batch_size, td.device, tuple(leaves), None if m is None else request_code(m))


def group_by_signature(inputs: list) -> tuple[dict, list]:
    """Split request indices into ``{signature: [index, ...]}`` plus ``[(index, error)]``."""
    groups: dict = {}
    bad: list = []
    for i, td in enumerate(inputs):
        try:
            sig = signature(td)
        except RequestError as e:
            bad.append((i, e))
            continue
        except Exception as e:  # a TensorDict subclass whose items() fails
            bad.append((i, RequestError(f"request could not be inspected: {e!r}")))
            continue
        g = groups.get(sig)
        if g is None:
            groups[sig] = [i]
        else:
            g.append(i)
    return groups, bad


def is_fast(sig: tuple) -> bool:
    """True for flat TensorDicts of dense tensors (stacked per key, split per key)."""
    return sig[0] == _FAST


def stack_leaves(tds: list) -> dict:
    """``{key: stacked tensor}`` of flat requests that share a fast signature."""
    ds = [entries(td) for td in tds]
    return {k: torch.stack([d[k] for d in ds]) for k in ds[0]}


def stack_group(sig: tuple, tds: list) -> TensorDictBase:
    """Stack requests that share ``sig`` into one batch along a new leading dim."""
    if sig[0] == _FAST:
        return new_td(stack_leaves(tds), torch.Size([len(tds), *sig[1]]), sig[2])
    return torch.stack(tds)  # copies: the batch never aliases a request


def batched_output(out: Any, n: int) -> TensorDictBase:
    """The model's output, checked to be a TensorDict with leading batch dimension ``n``.

    A TensorDict with no batch size whose leaves all lead with ``n`` (e.g.
    from ``TensorDictModule(inplace=False)``) gets ``batch_size=[n]``.
    """
    if not isinstance(out, TensorDictBase):
        raise TypeError(f"the model returned {type(out).__name__}, expected a TensorDict")
    if out.batch_dims == 0 and not out.is_empty():
        try:
            out.batch_size = torch.Size([n])
        except RuntimeError:
            pass
    if out.batch_dims == 0 or out.batch_size[0] != n:
        raise RuntimeError(
            f"the model returned batch_size={list(out.batch_size)} for a batch of {n} requests; "
            "it must keep the leading batch dimension"
        )
    return out


def split_rows(out: TensorDictBase) -> list:
    """Split a batched output into row TensorDicts (views of the output, never of requests)."""
    d = flat_leaves(out)
    if d is None:
        return list(out.unbind(0))
    return split_leaves(d, out.batch_size, out.device)


def split_leaves(d: dict, batch_size: torch.Size, device: torch.device | None) -> list:
    """Row TensorDicts from ``{key: batched tensor}`` (leading dim = number of rows)."""
    keys = list(d)
    cols = [v.unbind(0) for v in d.values()]
    row_bs = batch_size[1:]
    return [new_td(dict(zip(keys, row)), row_bs, device) for row in zip(*cols)]


def signature_device(sig: tuple) -> torch.device | None:
    """The device requests of this signature live on (their own, or their first leaf's)."""
    if sig[2] is not None:
        return sig[2]
    for leaf in sig[3]:
        if len(leaf) == 4:
            return leaf[3]
    return None
