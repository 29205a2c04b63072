"""What the tests share: models, the shared-memory and loopback checks. Importable by spawned children."""
import os
import queue
import socket
import time

import torch
import torch.nn as nn
from tensordict.nn import TensorDictModule

# Transports made by this test session, by token: /dev/shm checks look only at their segments, so a
# run beside another (a second checkout's tests, a benchmark) cannot make them fail.
_TOKENS: set = set()


def track_transport_tokens() -> None:
    """Record the token of every MPTransport this process creates (called once, by conftest)."""
    from rlserve.transports.mp import MPTransport

    if getattr(MPTransport.__init__, "_tracked", False):
        return
    real = MPTransport.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        _TOKENS.add(self.token)

    init._tracked = True
    MPTransport.__init__ = init


def track_token(token: str) -> None:
    """Count the segments of a transport made in another process (its token) as this session's."""
    _TOKENS.add(token)


def rlserve_shm() -> set:
    """Shared-memory segments in /dev/shm of the MPTransports this session made."""
    return {f for f in os.listdir("/dev/shm")
            if f.startswith("rlserve_") and f[len("rlserve_"):].split("_", 1)[0] in _TOKENS}


def seed_policy(obs_dim: int = 8, act_dim: int = 4) -> TensorDictModule:
    """The seed documents' policy: Linear(8,64)-ReLU-Linear(64,4) on "observation" -> "action"."""
    torch.manual_seed(0)
    return TensorDictModule(
        nn.Sequential(nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, act_dim)),
        in_keys=["observation"], out_keys=["action"])


class Doubler(nn.Module):
    """action = 2 * observation: any shape, so routing and grouping are visible."""

    def forward(self, obs):
        return obs * 2


def doubler() -> TensorDictModule:
    return TensorDictModule(Doubler(), in_keys=["observation"], out_keys=["action"])


class Slow(nn.Module):
    """x * 2 after sleeping ``s`` seconds (keeps a server busy)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        time.sleep(self.s)
        return x * 2


def slow_doubler(s: float) -> TensorDictModule:
    return TensorDictModule(Slow(s), in_keys=["observation"], out_keys=["action"])


def start_local_ray(**kwargs):
    """ray.init for tests: a new local instance (never another session's cluster), on loopback
    (conftest sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported)."""
    import ray

    opts = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    opts.update(kwargs)
    return ray.init(**opts)


# -- servers listen on loopback only ---------------------------------------------------------
_LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening_tcp():
    """{socket inode: (ip, port)} of every listening TCP socket (IPv4 and IPv6) on this machine."""
    out = {}
    for path, fam in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hexip, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexip)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(fields[9])] = (socket.inet_ntop(fam, raw), int(hexport, 16))
    return out


def socket_inodes(pid):
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in children.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _cmd(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def listening_sockets(within_pid: int) -> list:
    """[(pid, command, ip, port)]: listening TCP sockets of ``within_pid`` and every process it started
    (a Ray session's gcs_server, raylet, agents and workers; Monarch's processes)."""
    listening = _listening_tcp()
    found = []
    for pid in [within_pid, *_descendants(within_pid)]:
        for ino in sorted(socket_inodes(pid)):
            if ino in listening:
                found.append((pid, _cmd(pid), *listening[ino]))
    return found


def assert_loopback_only(within_pid: int, expect_some: bool = True) -> None:
    """Fail if a process of this tree listens on anything but 127.0.0.1 (or ::1)."""
    socks = listening_sockets(within_pid)
    assert socks or not expect_some, "found no listening socket (is the server running?)"
    exposed = [s for s in socks if s[2] not in _LOOPBACK]
    assert not exposed, "processes listen beyond loopback:\n" + "\n".join(
        f"  pid {pid} {ip}:{port}  {cmd}" for pid, cmd, ip, port in exposed)


def assert_ray_on_loopback_only(within_pid: int) -> None:
    """Every Ray process of the session this process started listens on 127.0.0.1 only."""
    assert_loopback_only(within_pid)


class QueueScheme:
    """A user scheme following torchrl's receiver protocol (spec section 4.1)."""

    def __init__(self):
        self.q = queue.Queue()
        self.initialized_on_receiver = False
        self.synchronized_on_receiver = False
        self.model = None
        self.model_id = None
        self.calls = []

    def init_on_receiver(self, *, model_id, model=None, worker_idx=0, **kwargs):
        self.calls.append("init_on_receiver")
        self.model_id, self.model = model_id, model
        self.initialized_on_receiver = True

    def connect(self, *, worker_idx=0, **kwargs):
        self.calls.append("connect")
        self.synchronized_on_receiver = True

    def receive(self, timeout=None):
        try:
            weights = self.q.get_nowait()
        except queue.Empty:
            return None
        weights.to_module(self.model)
        return weights

    def send(self, weights=None, worker_ids=None):  # torchrl's sender signature
        self.q.put(weights)
