"""The wire form of a flat TensorDict of CPU tensors: one ``bytes`` object.

Layout::

    MAGIC (2 bytes) | header length (u32) | header | leaf bytes, each leaf
    starting on a 16-byte boundary counted from the end of the header

``header`` is the pickled ``(batch_size, ((key, dtype name, shape), ...))``.
It is the same for every message of one signature, so both sides cache it:
encoding a request is one ``join`` of memoryviews, decoding one dict lookup,
one copy and a view per leaf. Why not pickle numpy arrays (the old form):
numpy's reduce costs ~4 us per array on each side, and ~3x that in a server
process whose caches go cold between requests (measured in the Monarch
server, where encoding one reply took ~60 us).

Payloads come from other processes: every field is checked before use, and
anything malformed is a :class:`~rlserve.RequestError`.
"""
from __future__ import annotations

import math
import pickle
import struct

import torch

from .._td import TensorDictBase, flat_leaves, new_td
from ..errors import RequestError

__all__ = ["encode_td", "decode_td", "encode_flat_rows"]

MAGIC = b"\xa7T"  # a pickle starts with b"\x80": the two never mix up
_HLEN = struct.Struct("<I")
_PRE = len(MAGIC) + _HLEN.size
_ALIGN = 16
_ZEROS = bytes(_ALIGN)
_CACHE_MAX = 1024  # distinct signatures remembered per side (a bound, not a tuning knob)

_DTYPES = {str(d): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)}
_NAMES = {d: n for n, d in _DTYPES.items()}

_NO_BYTES = memoryview(b"")
_headers: dict = {}  # signature -> MAGIC + length + header (encode side)
_layouts: dict = {}  # header bytes -> parsed layout (decode side)


def _raw(v: torch.Tensor) -> memoryview | None:
    """The bytes of a contiguous dense CPU tensor, without copying.

    None when the tensor shows no plain memory (a lazy conjugate or negative
    view): the caller then sends the TensorDict as it is.
    """
    try:
        try:
            a = v.numpy()
        except TypeError:  # no numpy dtype: bfloat16 is int16-sized, so view it as that
            if v.dtype is not torch.bfloat16:
                return None
            a = v.view(torch.int16).numpy()  # same strides, so any contiguous layout works
        if a.size == 0:  # memoryview cannot cast a shape with zeros
            return _NO_BYTES
        return memoryview(a).cast("B")
    except (TypeError, RuntimeError, ValueError):
        return None


def _leaf_bytes(v: torch.Tensor) -> memoryview | None:
    """A leaf's bytes in C order, or None when it cannot take the wire form."""
    if v.device.type != "cpu" or v.dtype not in _NAMES or v.layout is not torch.strided:
        return None
    if not v.is_contiguous():
        v = v.contiguous()  # shape and dtype unchanged: the header is the same
    return _raw(v)


def _prefix(sig) -> bytes:
    """MAGIC + length + header for a signature ``(batch_size, ((key, dtype, shape), ...))``."""
    p = _headers.get(sig)
    if p is None:
        bs, leaves = sig
        header = pickle.dumps((bs, tuple((k, _NAMES[d], tuple(s)) for k, d, s in leaves)), 5)
        p = MAGIC + _HLEN.pack(len(header)) + header
        if len(_headers) >= _CACHE_MAX:
            _headers.clear()
        _headers[sig] = p
    return p


def _join(prefix: bytes, views) -> bytes:
    parts = [prefix]
    for mv in views:
        parts.append(mv)
        pad = -mv.nbytes % _ALIGN
        if pad:
            parts.append(_ZEROS[:pad])
    return b"".join(parts)


def encode_td(td) -> object:
    """The cheapest picklable form of one request: wire bytes, else the TensorDict itself.

    Only a flat TensorDict of dense CPU tensors without grad takes the wire
    form; anything else travels as the TensorDict (pickled by the engine).
    """
    d = flat_leaves(td)
    if d is None:
        if isinstance(td, TensorDictBase):
            return td
        raise RequestError(f"request must be a TensorDict, got {type(td).__name__}")
    leaves = []
    views = []
    for k, v in d.items():
        mv = None if v.requires_grad else _leaf_bytes(v)
        if mv is None:
            return td
        leaves.append((k, v.dtype, v.shape))
        views.append(mv)
    return _join(_prefix((tuple(td.batch_size), tuple(leaves))), views)


def _parse(header: bytes):
    """Check a header from another process; returns ``(batch_size, leaves, data bytes)``."""
    bs, leaves = pickle.loads(header)
    if type(bs) is not tuple or not all(type(x) is int and x >= 0 for x in bs):
        raise ValueError(f"bad batch_size {bs!r}")
    out = []
    off = 0
    for k, name, shape in leaves:
        if type(k) is not str:
            raise ValueError(f"bad key {k!r}")
        dtype = _DTYPES.get(name)
        if dtype is None:
            raise ValueError(f"leaf {k!r}: unsupported dtype {name!r}")
        if type(shape) is not tuple or not all(type(x) is int and x >= 0 for x in shape):
            raise ValueError(f"leaf {k!r}: bad shape {shape!r}")
        if shape[: len(bs)] != bs:
            raise ValueError(f"leaf {k!r} has shape {list(shape)}, batch_size is {list(bs)}")
        numel = math.prod(shape)
        out.append((k, dtype, shape if len(shape) != 1 else None, off, numel))  # None: no view needed
        nbytes = numel * dtype.itemsize
        off += nbytes + (-nbytes % _ALIGN)
    return torch.Size(bs), tuple(out), off


def decode_td(payload) -> TensorDictBase:
    """Inverse of :func:`encode_td`; raises RequestError for anything else.

    The tensors share one fresh writable buffer: they alias neither the
    payload nor anything the sender holds.
    """
    if type(payload) is bytes:
        try:
            if payload[:2] != MAGIC:
                raise ValueError("not an rlserve wire message")
            (hlen,) = _HLEN.unpack_from(payload, 2)
            header = payload[_PRE:_PRE + hlen]
            layout = _layouts.get(header)
            if layout is None:
                layout = _parse(header)
                if len(_layouts) >= _CACHE_MAX:
                    _layouts.clear()
                _layouts[header] = layout
            bs, leaves, size = layout
            start = _PRE + hlen
            if len(payload) - start != size:
                raise ValueError(f"{len(payload) - start} data bytes, the header says {size}")
            buf = bytearray(memoryview(payload)[start:]) if size else None
            src = {}
            for k, dtype, shape, off, numel in leaves:
                if not numel:
                    src[k] = torch.empty(shape if shape is not None else (0,), dtype=dtype)
                    continue
                t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=off)
                src[k] = t.view(shape) if shape is not None else t
        except Exception as e:  # payloads come from other processes: check, never trust
            raise RequestError(f"malformed request: {type(e).__name__}: {e}") from None
        return new_td(src, bs)  # checked above, so skip the constructor's own checks
    if isinstance(payload, TensorDictBase):
        return payload
    raise RequestError(f"request must be a TensorDict, got {type(payload).__name__}")


def encode_flat_rows(d: dict, batch_size: torch.Size) -> list | None:
    """One wire row per leading index of a batched flat output (leaves ``d``).

    None when a leaf cannot take the wire form (the caller then sends rows as
    TensorDicts). Rows slice each column's bytes: no per-row tensor work.
    """
    n = batch_size[0]
    leaves = []
    cols = []
    for k, v in d.items():
        mv = _leaf_bytes(v.detach())
        if mv is None:
            return None
        leaves.append((k, v.dtype, v.shape[1:]))
        cols.append((mv, mv.nbytes // n if n else 0))
    prefix = _prefix((tuple(batch_size[1:]), tuple(leaves)))
    return [_join(prefix, [mv[i * rb:(i + 1) * rb] for mv, rb in cols]) for i in range(n)]
