"""Server half of MPTransport: lives only in the process that runs the InferenceServer.

It owns the server socket, the client registry (which client owns which slot
range), and the slot banks. Everything here runs on the server thread except
``close``/``wake``, which only set a flag and send a datagram.

A request counts only if it comes from the socket address its slot range was
registered with: a dead client's request still queued when its place is given
to another client is dropped, never answered to the new owner.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import select
import socket
import time
import weakref
from collections import deque

import torch

from .._td import TensorDict, TensorDictBase, entries
from ..errors import QueueFullError, RequestError, picklable_exception
from . import _wire as W
from ._shm import SHM_PREFIX, Bank, Layout, unlink_segment, unlink_token, walk_layout

log = logging.getLogger("rlserve")
_perf = time.perf_counter
_SWEEP_S = 0.5  # how often idle clients are checked for a dead process
_CLOSED_NOTICE_S = 0.25  # at shutdown, how long CLOSED is retried to a client whose queue is full
_LIVE_SIDES: "weakref.WeakSet[ServerSide]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A fork child must not hold the server's socket: it would keep the
    # address bound after the serving process dies (clients would wait
    # forever), swallow registrations after a shutdown, and block a restart.
    for side in list(_LIVE_SIDES):
        side._abandon_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Client:
    __slots__ = ("cid", "addr", "pid", "inflight", "dead", "files")

    def __init__(self, cid, addr, pid):
        self.cid, self.addr, self.pid = cid, addr, pid
        self.inflight = 0
        self.dead = False
        self.files: dict = {}  # slot -> one-shot answer file sent to it (removed by its reader)


class ServerSide:
    """Socket, registry and banks of one serving MPTransport."""

    def __init__(self, tr, version_key):
        self.tr = tr
        self.token = tr.token
        self.per = tr.max_inflight
        self.max_clients = tr.max_clients
        self.slots = self.per * self.max_clients
        self.rsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.rsock.bind(W.server_address(self.token))
        except OSError as e:
            self.rsock.close()
            raise RuntimeError("this MPTransport is already being served (by another process?)") from e
        self.rsock.setblocking(False)
        self.ssock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ssock.setblocking(False)
        self.poll = select.poll()
        self.poll.register(self.rsock, select.POLLIN)
        self.buf = bytearray(W.HLEN + W.INLINE_MAX + 64)
        self.view = memoryview(self.buf)
        self.clients: dict[int, _Client] = {}
        self.free_ids = list(range(self.max_clients - 1, -1, -1))
        self.pending: deque = deque()
        self.backlog: deque = deque()  # (client, message) that met a full client queue
        self.closed = False
        self.torn_down = False
        self.next_sweep = time.monotonic() + _SWEEP_S
        spin_us = tr.spin_us if tr.spin_us is not None else tr.default_spin_us
        self.spin_s = spin_us * 1e-6
        self.last_active = 0.0  # perf_counter of the newest drain or answer (spin-wait window)
        self.epoch = 0
        self.counts = {"fast_requests": 0, "pickled_requests": 0, "fast_answers": 0, "pickled_answers": 0,
                       "spin_hits": 0}  # waits that a spin-poll ended without sleeping
        self.req_bank = self.resp_bank = None
        self.in_tds: list = []
        self.resp_declared = tr.response_layout is not None
        if tr.request_layout is not None:
            self._make_bank("req", tr.request_layout)
        if tr.response_layout is not None:
            layout = tr.response_layout
            if version_key is not None:  # answers carry the version stamp as one more leaf
                layout = layout.with_leaf(version_key, layout.batch_size, torch.int64)
            self._make_bank("resp", layout)
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref()._unlink_banks())
        atexit.register(self._atexit)
        _LIVE_SIDES.add(self)

    def _abandon_in_child(self) -> None:
        """In a fork child: close our copies of the sockets; the banks stay the parent's."""
        self.torn_down = True
        for s in (self.rsock, self.ssock):
            try:
                s.close()
            except OSError:
                pass
        atexit.unregister(self._atexit)

    # -- banks -------------------------------------------------------------------
    def _make_bank(self, which: str, layout: Layout) -> Bank:
        self.epoch += 1
        name = f"{SHM_PREFIX}{self.token}_{which}{self.epoch}"
        bank = Bank(name, layout, self.slots, create=True)
        if which == "req":
            self.req_bank = bank
            self.in_tds = [None] * self.slots
        else:
            self.resp_bank = bank
        msg = W.pack(W.LAYOUT, 0, 0.0, W.encode((which, bank.describe()), self.token))
        for c in list(self.clients.values()):
            self._send(c, msg)
        return bank

    def _unlink_banks(self) -> None:
        for b in (self.req_bank, self.resp_bank):
            if b is not None:
                b.unlink()

    # -- receiving ---------------------------------------------------------------
    def wait(self, timeout: float) -> None:
        if self.backlog:
            self._flush_backlog()
        if self.pending:
            return
        if time.monotonic() >= self.next_sweep:
            self._sweep()
        if self.spin_s:
            # Busy-poll a short while after the last work: the next request of an
            # active client then needs no wake-up (costly on VMs). Yielding lets
            # runnable processes (the clients) have this core meanwhile.
            start = _perf()
            end = min(self.last_active + self.spin_s, start + timeout)
            poll, yield_ = self.poll.poll, os.sched_yield
            while _perf() < end:
                if poll(0):
                    self.counts["spin_hits"] += 1
                    return
                yield_()
            timeout -= _perf() - start  # the spin was part of the wait
        self.poll.poll(max(0, math.ceil(timeout * 1000)))

    def drain(self, max_items: int):
        self.pump()
        q = self.pending
        n = min(len(q), max_items)
        if n == 0:
            server = self.tr.server
            if self.closed or server is None or not server.accepting:
                self.teardown()
            return [], [], []
        pop = q.popleft
        items = [pop() for _ in range(n)]
        ins, cbs, ts = zip(*items)
        self.last_active = _perf()
        return list(ins), list(cbs), list(ts)

    def pump(self) -> None:
        """Read every datagram waiting on the server socket."""
        if self.torn_down:
            return
        recv = self.rsock.recvfrom_into
        buf, view, unpack = self.buf, self.view, W.HEADER.unpack_from
        per, clients, pending = self.per, self.clients, self.pending
        while True:
            try:
                n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                break
            if n < W.HLEN:
                continue
            kind, slot, t = unpack(buf)
            if kind == W.REQ_FAST:
                c = clients.get(slot // per)
                if c is None or c.addr != addr or c.dead or self.req_bank is None:
                    # Not a registration of this server (it restarted, or dropped the client): tell the
                    # sender, never the slot's current owner, so it registers again.
                    self._sendto(addr, W.pack(W.STALE, slot, 0.0))
                    continue
                c.inflight += 1
                self.counts["fast_requests"] += 1
                td = self.in_tds[slot]
                if td is None:
                    td = self.in_tds[slot] = self.req_bank.slot_td(slot)
                pending.append((td, slot, t))
            elif kind == W.REQ_PICKLE:
                self._general_request(slot, t, view[W.HLEN:n], addr)
            elif kind == W.REGISTER:
                self._register(addr, view[W.HLEN:n])
            elif kind == W.BYE:
                c = clients.get(slot // per)
                if c is not None and c.addr == addr:
                    self._drop(c)
            # PING and WAKE need no answer: receiving them was the point

    def _general_request(self, slot, t, payload, addr) -> None:
        c = self.clients.get(slot // self.per)
        if c is None or c.addr != addr or c.dead:
            W.drop_payload(payload)
            self._sendto(addr, W.pack(W.STALE, slot, 0.0))
            return
        c.inflight += 1
        self.counts["pickled_requests"] += 1
        try:
            td = W.decode(payload)
        except Exception as e:
            self.resolve_exception(slot, RequestError(f"the request could not be unpickled in the server: {e!r}"))
            return
        if not isinstance(td, TensorDictBase):
            self.resolve_exception(slot, RequestError(f"request must be a TensorDict, got {type(td).__name__}"))
            return
        if self.req_bank is None and self.tr.learn_layout and not self.closed:
            layout = Layout.from_td(td)
            if layout is not None:
                self._make_bank("req", layout)
        self.pending.append((td, slot, t))

    def _register(self, addr, payload) -> None:
        try:
            pid = W.decode(payload)
        except Exception:
            return
        if self.closed:
            self._sendto(addr, W.pack(W.CLOSED, 0, 0.0))
            return
        if not self.free_ids:
            self._sweep()
        if not self.free_ids:
            err = QueueFullError(f"all {self.max_clients} client places of this MPTransport are taken (max_clients)")
            self._sendto(addr, W.pack(W.REFUSED, 0, 0.0, W.encode(err, self.token)))
            return
        cid = self.free_ids.pop()
        c = self.clients[cid] = _Client(cid, addr, int(pid))
        info = (
            cid, cid * self.per, self.per,
            self.req_bank.describe() if self.req_bank else None,
            self.resp_bank.describe() if self.resp_bank else None,
            os.getpid(),  # lets clients notice this process dying even if its socket lingers
        )
        self._send(c, W.pack(W.REGISTERED, 0, 0.0, W.encode(info, self.token)))

    # -- clients coming and going --------------------------------------------------
    def _sweep(self) -> None:
        self.next_sweep = time.monotonic() + _SWEEP_S
        me = os.getpid()
        for c in list(self.clients.values()):
            if c.pid != me and not c.dead and not W.pid_alive(c.pid):
                self._drop(c)

    def _drop(self, c: _Client) -> None:
        c.dead = True
        for name in c.files.values():  # answers it will never read
            unlink_segment(name)
        c.files.clear()
        if c.inflight <= 0 and self.clients.get(c.cid) is c:
            del self.clients[c.cid]
            self.free_ids.append(c.cid)

    def _answered(self, slot: int):
        c = self.clients.get(slot // self.per)
        if c is None:
            return None
        c.inflight -= 1
        if c.dead:
            self._drop(c)
            return None
        return c

    # -- sending -------------------------------------------------------------------
    def _sendto(self, addr, msg) -> bool:
        try:
            self.ssock.sendto(msg, addr)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return False

    def _send(self, c: _Client, msg) -> None:
        if self.backlog:
            self.backlog.append((c, msg))  # keep per-client order
            return
        try:
            self.ssock.sendto(msg, c.addr)
        except BlockingIOError:
            self.backlog.append((c, msg))
        except (ConnectionRefusedError, FileNotFoundError, OSError):
            self._discard(msg)
            self._drop(c)  # its process is gone: the kernel closed its socket
        else:
            if msg[0] in (W.ANS_PICKLE, W.ERR) and msg[W.HLEN:W.HLEN + 1] == b"F":
                slot = W.HEADER.unpack_from(msg)[1]
                c.files[slot] = bytes(msg[W.HLEN + 1:]).decode()

    @staticmethod
    def _discard(msg) -> None:
        """Remove the one-shot file of an answer that will not be delivered."""
        if msg[0] in (W.ANS_PICKLE, W.ERR):
            W.drop_payload(memoryview(msg)[W.HLEN:])

    def _flush_backlog(self) -> None:
        bl, self.backlog = self.backlog, deque()
        for i, (c, msg) in enumerate(bl):
            if c.dead:
                self._discard(msg)
                continue
            self._send(c, msg)
            if self.backlog:  # still full: keep the rest, in order
                self.backlog.extend(list(bl)[i + 1:])
                return

    # -- answers -------------------------------------------------------------------
    def resolve_batch(self, slots: list, out) -> None:
        """Answer a batch (the model's output, version stamped): into the bank when it fits, else pickled."""
        n = len(slots)
        try:
            if self.resp_bank is None and self.tr.learn_layout and not self.closed:
                layout = Layout.from_td(out, drop_leading=True)
                if layout is not None:
                    self._make_bank("resp", layout)
            vals = self._fit_batch(out, n)
        except Exception as e:
            for s in slots:
                self.resolve_exception(s, e)
            return
        if vals is not None:
            bank = self.resp_bank
            idx = torch.tensor(slots, dtype=torch.int64)
            for dst, v in zip(bank.tensors, vals):
                dst.index_copy_(0, idx, v)
            self.counts["fast_answers"] += n
            for s in slots:
                c = self._answered(s)
                if c is not None:
                    self._send(c, W.pack(W.ANS_FAST, s, 0.0))
            self.last_active = _perf()
            return
        for i, s in enumerate(slots):
            try:
                row = out[i].clone()
            except Exception as e:
                self.resolve_exception(s, e)
                continue
            self.resolve_pickled(s, row)

    def _fit_batch(self, out, n):
        """Batched leaves of ``out`` in response-layout order, or None (general path)."""
        bank = self.resp_bank
        if bank is None or type(out) is not TensorDict:
            return None
        L = bank.layout
        if out.batch_size[1:] != L.batch_size:
            return None
        if self.resp_declared:  # only the declared keys travel (documented): extra ones may be anything
            vals = [out.get(k, None) for k, _, _ in L.leaves]
        else:  # a learned layout must match exactly: no extra key, no non-tensor entry
            vals = [None] * len(L.leaves)
            if not walk_layout(entries(out), L, vals):
                return None
        for (_, shape, dtype), v in zip(L.leaves, vals):
            if type(v) is not torch.Tensor or v.dtype != dtype or v.shape[1:] != shape or not v.is_cpu:
                return None
        return vals

    def resolve_pickled(self, slot: int, row) -> None:
        c = self._answered(slot)
        if c is None:
            return
        try:
            payload = W.encode(row, self.token)
        except Exception as e:
            self._send(c, W.pack(W.ERR, slot, 0.0, W.encode(
                RequestError(f"the answer could not be pickled: {e!r}"), self.token)))
            return
        self.counts["pickled_answers"] += 1
        self._send(c, W.pack(W.ANS_PICKLE, slot, 0.0, payload))
        self.last_active = _perf()  # the spin window starts at the answer, as on the fast path

    def resolve_exception(self, slot: int, exc: BaseException) -> None:
        c = self._answered(slot)
        if c is None:
            return
        self._send(c, W.pack(W.ERR, slot, 0.0, W.encode(picklable_exception(exc), self.token)))
        self.last_active = _perf()

    # -- shutdown --------------------------------------------------------------------
    def teardown(self) -> None:
        """Tell every client the server is gone, close the socket, unlink the banks."""
        if self.torn_down:
            return
        self.torn_down = True
        server = self.tr.server
        dead = 1 if server is not None and server.died is not None else 0
        self._flush_backlog()
        msg = W.pack(W.CLOSED, dead, 0.0)
        self._tell_closed(msg)
        self._refuse_queued(msg)
        self.rsock.close()
        self.ssock.close()
        self._unlink_banks()
        unlink_token(self.token + "_m")  # one-shot payload files nobody will read now
        atexit.unregister(self._atexit)

    def _tell_closed(self, msg: bytes) -> None:
        """CLOSED to every client. A client whose queue is full is reading it (or will): retry it for a
        moment, else it would take a clean shutdown for a crash."""
        addrs = [c.addr for c in self.clients.values()]
        deadline = time.monotonic() + _CLOSED_NOTICE_S
        while addrs:
            full = []
            for addr in addrs:
                try:
                    self.ssock.sendto(msg, addr)
                except BlockingIOError:
                    full.append(addr)
                except OSError:  # the client is gone
                    pass
            addrs = full
            if addrs:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.001)

    def _refuse_queued(self, msg: bytes) -> None:
        """Datagrams still queued at shutdown: a registration gets CLOSED (silence would read as a
        crash); a pickled request's payload file is removed. Registered clients were told already."""
        while True:
            try:
                n, addr = self.rsock.recvfrom_into(self.buf)
            except OSError:  # empty (BlockingIOError) or closed
                return
            if n < W.HLEN:
                continue
            kind = W.HEADER.unpack_from(self.buf)[0]
            if kind == W.REGISTER:
                self._sendto(addr, msg)
            elif kind == W.REQ_PICKLE:
                W.drop_payload(self.view[W.HLEN:n])

    def usage(self) -> dict:
        return {
            "clients": len(self.clients),
            "free_client_places": len(self.free_ids),
            "inflight": sum(c.inflight for c in self.clients.values()),
            "request_layout": repr(self.req_bank.layout) if self.req_bank else None,
            "response_layout": repr(self.resp_bank.layout) if self.resp_bank else None,
            **self.counts,
        }
