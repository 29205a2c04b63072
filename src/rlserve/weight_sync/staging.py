"""A triple buffer of weights in shared memory: one writer, one reader, newest wins.

Why three slots: the trainer must never write into the slot the server is
copying from, nor into the newest published slot (the server may pick it up at
any moment). With three slots there is always a third one free, so the trainer
never waits for the server and the server never waits for the trainer; a
trainer that sends faster than the server applies just overwrites its own
unread sets, so memory stays at three copies however fast it sends.

Shared state (one small int64 tensor in shared memory, guarded by one lock held
only for a few integer reads/writes, never during a copy):

    SEQ             bumped on every publish; the reader polls it without the lock
    VERSION         last version handed out by the writer
    LATEST          slot holding the newest complete set (-1: none yet)
    LATEST_VERSION  version of that set
    READING         slot the reader copied from last (the writer avoids it)
    READER_PID      pid of the attached reader (0: none), one reader at a time

The data of each slot is one flat byte buffer; the named tensors are views into
it, rebuilt after unpickling, so a process receives four shared blocks however
many tensors the model has.
"""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import torch

from ..transports._wire import pid_alive

SEQ, VERSION, LATEST, LATEST_VERSION, READING, READER_PID = range(6)
NUM_SLOTS = 3
_ALIGN = 64


def _layout(weights: dict) -> list:
    """``[(name, shape, dtype, byte_offset)]`` and the total size, 64-byte aligned."""
    out, off = [], 0
    for name, t in weights.items():
        out.append((name, tuple(t.shape), t.dtype, off))
        off += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return out, max(off, _ALIGN)


class TripleBuffer:
    """Shared staging for one set of named tensors (see module docstring)."""

    def __init__(self, template: dict, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.layout, nbytes = _layout(template)
        self._bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(NUM_SLOTS)]
        self._ctl = torch.zeros(8, dtype=torch.int64)
        self._ctl[LATEST] = -1
        self._ctl[READING] = -1
        if self.device.type == "cpu":
            for b in self._bufs:
                b.share_memory_()
        self._ctl.share_memory_()
        # spawn context: its lock pickles into spawn'ed and fork'ed children alike
        self._lock = mp.get_context("spawn").Lock()
        self._build_views()

    # -- pickling: buffers travel as shared memory, views are rebuilt ----------
    def __getstate__(self):
        return {"device": self.device, "layout": self.layout, "_bufs": self._bufs, "_ctl": self._ctl, "_lock": self._lock}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_views()

    def _build_views(self) -> None:
        self._c = self._ctl.numpy()  # cheap racy reads of SEQ on the hot path
        self.slots = []
        for buf in self._bufs:
            views = {}
            for name, shape, dtype, off in self.layout:
                n = int(np.prod(shape, dtype=np.int64)) if shape else 1
                size = n * torch.empty((), dtype=dtype).element_size()
                views[name] = buf[off : off + size].view(dtype).view(shape)
            self.slots.append(views)

    @property
    def template(self) -> dict:
        return self.slots[0]

    # -- writer ----------------------------------------------------------------
    def write(self, weights: dict, version: int | None = None) -> int:
        """Copy ``weights`` into a free slot and publish them; returns their version.

        Single writer: callers serialise calls (the schemes hold a thread lock).
        """
        c = self._c
        with self._lock:
            busy = {int(c[LATEST]), int(c[READING])}
            slot = next(i for i in range(NUM_SLOTS) if i not in busy)
        dst = self.slots[slot]
        with torch.no_grad():
            for name, t in dst.items():
                t.copy_(weights[name])
        if self.device.type == "cuda":
            # copies into GPU memory are asynchronous: the data must be complete before publish
            torch.cuda.synchronize(self.device)
        with self._lock:
            v = int(c[VERSION]) + 1 if version is None else int(version)
            c[VERSION] = v
            c[LATEST] = slot
            c[LATEST_VERSION] = v
            c[SEQ] += 1
        return v

    @property
    def version(self) -> int:
        return int(self._c[VERSION])

    # -- reader ----------------------------------------------------------------
    def seq(self) -> int:
        return int(self._c[SEQ])

    def take(self, last_seq: int) -> tuple | None:
        """Claim the newest slot if something new was published since ``last_seq``.

        Returns ``(views, version, seq)`` or None. Never waits: if the writer
        holds the lock this instant, the caller retries at its next batch.
        """
        c = self._c
        if int(c[SEQ]) == last_seq:
            return None
        if not self._lock.acquire(block=False):
            return None
        try:
            slot = int(c[LATEST])
            if slot < 0:
                return None
            c[READING] = slot  # held until the next take: the writer avoids it
            return self.slots[slot], int(c[LATEST_VERSION]), int(c[SEQ])
        finally:
            self._lock.release()

    def attach_reader(self) -> None:
        c, me = self._c, os.getpid()
        with self._lock:
            pid = int(c[READER_PID])
            if pid and pid_alive(pid):
                raise RuntimeError(
                    f"this weight-sync scheme already feeds a server (in process {pid}); "
                    "create one scheme per server"
                )
            c[READER_PID] = me

    def detach_reader(self) -> None:
        c = self._c
        with self._lock:
            if int(c[READER_PID]) == os.getpid():
                c[READER_PID] = 0
                c[READING] = -1
