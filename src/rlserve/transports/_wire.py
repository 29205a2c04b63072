"""What crosses processes for MPTransport: tiny datagrams on abstract Unix sockets.

Each message is a 13-byte header ``(kind, slot, time)`` optionally followed
by a payload. Fast-path requests and answers are the header alone: the data
sits in shared-memory slots. Payloads (general-path requests and answers,
errors, control) are pickled; those over ``INLINE_MAX`` bytes travel in a
one-shot ``/dev/shm`` file whose name is sent instead.

Why abstract Unix datagram sockets: any process can reach one by name (no
file descriptor to pass at spawn time, so clients made late, in processes
started any way, still connect), messages keep their boundaries, nothing is
left on disk, and the kernel closes a socket when its process dies, so a
send to a dead peer fails at once with ``ConnectionRefusedError``.
"""
from __future__ import annotations

import os
import pickle
import struct
import uuid

from ._shm import SHM_DIR, SHM_PREFIX

HEADER = struct.Struct("<bid")
HLEN = HEADER.size
INLINE_MAX = 48 * 1024

# client -> server
REQ_FAST = 1      # the request is in the client's slot of the request bank
REQ_PICKLE = 2    # payload: the pickled request (general path)
REGISTER = 3      # payload: pid
BYE = 4           # the client is closing; its slots can be reused
PING = 5          # liveness probe (a send that fails means the server is gone)
WAKE = 6          # the server waking its own wait_for_work
KICK = 7          # a client thread waking the one of its threads that reads its socket
# server -> client
ANS_FAST = 11     # the answer is in the slot of the response bank
ANS_PICKLE = 12   # payload: the pickled answer
ERR = 13          # payload: the pickled exception
REGISTERED = 14   # payload: (client id, first slot, slots, request bank, response bank, server pid)
LAYOUT = 15       # payload: ("req" | "resp", bank description)
CLOSED = 16       # the server shut down
REFUSED = 17      # payload: exception (registration refused)
STALE = 18        # a request from a registration this server does not know (it restarted): register again


def server_address(token: str) -> bytes:
    return f"\0rlserve-{token}-srv".encode()


def client_address(token: str) -> bytes:
    return f"\0rlserve-{token}-c{os.getpid()}-{uuid.uuid4().hex[:12]}".encode()


def pack(kind: int, slot: int, t: float, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, slot, t) + payload


def encode(obj, token: str) -> bytes:
    """Pickle ``obj``; inline when small, else through a one-shot shm file."""
    data = pickle.dumps(obj, protocol=5)
    if len(data) <= INLINE_MAX:
        return b"I" + data
    name = f"{SHM_PREFIX}{token}_m_{uuid.uuid4().hex}"
    with open(os.path.join(SHM_DIR, name), "wb") as f:
        f.write(data)
    return b"F" + name.encode()


def decode(buf):
    """Inverse of :func:`encode` (removes the one-shot file)."""
    mv = memoryview(buf)
    if mv[:1] == b"I":
        return pickle.loads(mv[1:])
    path = os.path.join(SHM_DIR, bytes(mv[1:]).decode())
    try:
        with open(path, "rb") as f:
            data = f.read()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return pickle.loads(data)


def drop_payload(buf) -> None:
    """Discard a payload nobody will read (removes its one-shot file)."""
    mv = memoryview(buf)
    if mv[:1] == b"F":
        try:
            os.unlink(os.path.join(SHM_DIR, bytes(mv[1:]).decode()))
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")
    except OSError:
        return False
