"""Shared-memory slot banks for MPTransport: a layout, and one segment of rows.

A *layout* fixes what one request (or answer) looks like: its batch size and,
per leaf, the key (nested keys are tuples), shape and dtype. A *bank* is one
POSIX shared-memory segment holding ``slots`` rows of a layout: per leaf one
tensor ``[slots, *shape]``. A client writes its row into its own slot and
sends only the slot id; the server gathers rows straight from the bank.

Segments are named ``rlserve_<token>_...`` and live in ``/dev/shm``. The
creating process registers each with ``multiprocessing``'s resource tracker
so a crash still unlinks it; attaching processes open the file directly and
do not register (Python 3.11's SharedMemory would register them too, and a
tracker that is not the creator's would unlink a live segment).
"""
from __future__ import annotations

import glob
import mmap
import os

import torch

from .._td import TensorDict, entries, new_td

__all__ = ["Layout", "Bank", "SHM_DIR", "SHM_PREFIX", "unlink_segment", "unlink_token", "walk_layout"]

SHM_DIR = "/dev/shm"
SHM_PREFIX = "rlserve_"
_ALIGN = 64


def _tracker(op: str, name: str) -> None:
    try:
        from multiprocessing import resource_tracker

        getattr(resource_tracker, op)("/" + name, "shared_memory")
    except Exception:  # the tracker is a safety net only
        pass


def unlink_segment(name: str) -> None:
    """Remove one segment by name (idempotent)."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def unlink_token(token: str) -> list[str]:
    """Remove every segment of one transport (after a crash); returns the names removed."""
    gone = []
    for path in glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}{token}_*")):
        try:
            os.unlink(path)
            gone.append(os.path.basename(path))
        except FileNotFoundError:
            pass
    return gone


class Layout:
    """Batch size plus ``(key, shape, dtype)`` per leaf of one request or answer."""

    __slots__ = ("batch_size", "leaves", "_tree", "_flat")

    def __init__(self, batch_size, leaves):
        self.batch_size = torch.Size(batch_size)
        self.leaves = tuple((k, torch.Size(s), d) for k, s, d in leaves)
        self._flat = all(isinstance(k, str) for k, _, _ in self.leaves)
        tree: dict = {}
        for i, (k, _, _) in enumerate(self.leaves):
            path = (k,) if isinstance(k, str) else tuple(k)
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = i
        self._tree = tree

    @classmethod
    def from_td(cls, td, drop_leading: bool = False) -> "Layout | None":
        """The layout of ``td`` (of its rows if ``drop_leading``); None if not bankable.

        Bankable means: a plain TensorDict of dense CPU tensors, no non-tensor data.
        """
        if type(td) is not TensorDict:
            return None
        leaves = []
        if not _dense_leaves(entries(td), (), leaves):
            return None
        if drop_leading:
            leaves = [(k, s[1:], d) for k, s, d in leaves]
        if not leaves:
            return None
        bs = td.batch_size[1:] if drop_leading else td.batch_size
        return cls(bs, leaves)

    def __getstate__(self):
        return (tuple(self.batch_size), [(k, tuple(s), d) for k, s, d in self.leaves])

    def __setstate__(self, state):
        self.__init__(*state)

    def __eq__(self, other):
        return isinstance(other, Layout) and self.__getstate__() == other.__getstate__()

    def __repr__(self):
        body = ", ".join(f"{k!r}: {list(s)} {str(d).replace('torch.', '')}" for k, s, d in self.leaves)
        return f"Layout(batch_size={list(self.batch_size)}, {body})"

    def tree(self) -> dict:
        """Nested ``{key: subtree or leaf index}`` of this layout's keys."""
        return self._tree

    def match(self, td) -> list | None:
        """``td``'s leaf tensors in layout order if ``td`` fits exactly, else None.

        Exact fit: plain TensorDict, same batch size, same key set, and each
        leaf a dense CPU tensor of the layout's shape and dtype.
        """
        if type(td) is not TensorDict or td.batch_size != self.batch_size:
            return None
        out = [None] * len(self.leaves)
        if not _walk(entries(td), self._tree, out):
            return None
        for (_, shape, dtype), v in zip(self.leaves, out):
            if v.shape != shape or v.dtype != dtype or not v.is_cpu:
                return None
        return out

    def mismatch(self, td) -> str:
        """Why ``td`` does not fit (for error messages)."""
        other = Layout.from_td(td) if type(td) is TensorDict else None
        if other is None:
            return f"request is a {type(td).__name__} with non-tensor or non-CPU leaves"
        mine = {k: (s, d) for k, s, d in self.leaves}
        theirs = {k: (s, d) for k, s, d in other.leaves}
        parts = []
        if missing := [k for k in mine if k not in theirs]:
            parts.append(f"missing keys {missing}")
        if extra := [k for k in theirs if k not in mine]:
            parts.append(f"unexpected keys {extra}")
        for k in mine.keys() & theirs.keys():
            if mine[k] != theirs[k]:
                (s, d), (es, ed) = theirs[k], mine[k]
                parts.append(f"{k!r} is shape={list(s)} dtype={d}, expected shape={list(es)} dtype={ed}")
        if other.batch_size != self.batch_size:
            parts.append(f"batch_size {list(other.batch_size)}, expected {list(self.batch_size)}")
        return "; ".join(parts) or "layouts differ"

    def build(self, tensors: list, extra: dict | None = None):
        """A TensorDict with ``tensors`` (layout order) as leaves, plus ``extra`` top-level keys."""
        if self._flat:
            d = {k: t for (k, _, _), t in zip(self.leaves, tensors)}
            if extra:
                d.update(extra)
            return new_td(d, self.batch_size)
        td = TensorDict({}, batch_size=self.batch_size)
        for (k, _, _), t in zip(self.leaves, tensors):
            td.set(k, t)
        if extra:
            for k, v in extra.items():
                td.set(k, v)
        return td

    def with_leaf(self, key, shape, dtype) -> "Layout":
        """This layout plus one leaf (unchanged if it has ``key`` already)."""
        if any(k == key for k, _, _ in self.leaves):
            return self
        return Layout(self.batch_size, [*self.leaves, (key, shape, dtype)])

    def nbytes(self) -> int:
        return sum(_aligned(s.numel() * _itemsize(d)) for _, s, d in self.leaves)


def _dense_leaves(d: dict, prefix: tuple, out: list) -> bool:
    """Append ``(key, shape, dtype)`` of every leaf; False if any entry is not a dense CPU
    tensor or a plain TensorDict of them (non-tensor data never fits a bank: it would be lost)."""
    for k, v in d.items():
        key = prefix + (k,)
        if type(v) is TensorDict:
            if not _dense_leaves(entries(v), key, out):
                return False
        elif type(v) is not torch.Tensor or v.device.type != "cpu" or v.is_sparse:
            return False
        else:
            out.append((key[0] if len(key) == 1 else key, v.shape, v.dtype))
    return True


def walk_layout(d: dict, layout: Layout, out: list) -> bool:
    """Fill ``out`` with the tensors of a TensorDict's storage ``d`` in ``layout`` order; False
    unless ``d`` has exactly the layout's keys, each a tensor (shapes and dtypes not checked)."""
    return _walk(d, layout.tree(), out)


def _walk(d: dict, tree: dict, out: list) -> bool:
    if len(d) != len(tree):
        return False
    for key, node in tree.items():
        v = d.get(key)
        if v is None:
            return False
        if type(node) is dict:
            if type(v) is not TensorDict or not _walk(entries(v), node, out):
                return False
        elif type(v) is not torch.Tensor:
            return False
        else:
            out[node] = v
    return True


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Bank:
    """``slots`` rows of ``layout`` in one segment.

    ``create=True`` makes the segment (the server side); otherwise it is
    attached by name. ``tensors[i]`` is the ``[slots, *shape]`` tensor of leaf
    ``i``.
    """

    def __init__(self, name: str, layout: Layout, slots: int, create: bool):
        self.name = name
        self.layout = layout
        self.slots = slots
        sizes = [_aligned(slots * s.numel() * _itemsize(d)) for _, s, d in layout.leaves]
        total = max(sum(sizes), _ALIGN)
        path = os.path.join(SHM_DIR, name)
        if create:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            _tracker("register", name)
            try:
                os.ftruncate(fd, total)
                self._mm = mmap.mmap(fd, total)
            finally:
                os.close(fd)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                self._mm = mmap.mmap(fd, total)
            finally:
                os.close(fd)
        self.created = create
        self.tensors = []
        off = 0
        for (_, shape, dtype), size in zip(layout.leaves, sizes):
            n = slots * shape.numel()
            t = torch.frombuffer(self._mm, dtype=dtype, count=n, offset=off) if n else torch.empty(0, dtype=dtype)
            self.tensors.append(t.view(slots, *shape))
            off += size

    def row_views(self, slot: int) -> list:
        """Per-leaf views of one slot's row."""
        return [t[slot] for t in self.tensors]

    def slot_td(self, slot: int):
        """A TensorDict whose leaves are views of one slot's row (server-side input)."""
        return self.layout.build(self.row_views(slot))

    def describe(self) -> tuple:
        """What a client needs to attach: (name, layout, slots)."""
        return (self.name, self.layout, self.slots)

    def unlink(self) -> None:
        """Remove the name (mappings stay valid until dropped)."""
        unlink_segment(self.name)
        if self.created:
            _tracker("unregister", self.name)
            self.created = False
