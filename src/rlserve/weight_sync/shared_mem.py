"""SharedMemWeightSyncScheme: the trainer publishes into shared staging, the server copies in between batches."""
from __future__ import annotations

import multiprocessing.context as mpc
import threading
from typing import Any

from .base import WeightSyncScheme, copy_weights_, prepare_weights, weights_of
from .staging import TripleBuffer

__all__ = ["SharedMemWeightSyncScheme"]


class SharedMemWeightSyncScheme(WeightSyncScheme):
    """Newest-wins weight sync through a triple buffer in shared memory.

    ``send`` validates the weights, copies them into a free staging slot and
    publishes them with the next version number (returned). The server, on
    its own thread and between batches, copies the newest published slot into
    the live parameters and buffers in place, so a forward never sees a mix of
    two weight sets and every answer's ``policy_version`` names the set that
    produced it. Neither side waits for the other: the trainer never writes a
    slot the server may be reading, and the server skips a check (serving the
    weights it has) in the rare instant the trainer holds the bookkeeping lock.

    Works with the trainer and the server in one process, or in two: call
    ``init_on_sender`` first, then hand the scheme to the server's process as
    an argument of ``multiprocessing.Process`` (spawn or fork); the staging is
    shared, not copied. One scheme feeds one server.

    Args:
        device: where the staging slots live. ``None``: CPU shared memory,
            reachable from any process. A CUDA device keeps the server's copy
            device-to-device when the served model lives there.
    """

    def __init__(self, device=None):
        self.device = device
        self._buf: TripleBuffer | None = None
        self._send_lock = threading.Lock()
        self._sender_model = None
        self._receiver_model = None
        self._live = None
        self._seen = 0

    # -- trainer side ------------------------------------------------------------
    def init_on_sender(self, model: Any = None, weights: Any = None, **kwargs: Any) -> None:
        """Allocate the staging from ``model`` (or ``weights``); later ``send()`` uses ``model``.

        Extra keyword arguments of torchrl's schemes (``model_id``, ``devices``,
        ...) are accepted and ignored. Given only ``weights`` (e.g. torchrl's
        ``TensorDict.from_module(model)``), ``send()`` publishes their current values.
        """
        self._sender_model = model if model is not None else weights
        src = weights if weights is not None else model
        if src is None:
            return  # staging allocated at the first send or by the receiver (same process)
        with self._send_lock:
            self._ensure_staging(src)
            prepare_weights(self._buf.template, src)  # a server may have allocated it first

    def send(self, model: Any = None, weights: Any = None, version: int | None = None) -> int:
        """Publish ``model``'s (or ``weights``') parameters and buffers; returns their version.

        Raises ValueError (and publishes nothing) when they do not match the
        served model's keys, shapes and dtypes. With neither argument, sends
        the model (or weights) given to ``init_on_sender``, as torchrl's ``send()`` does.
        """
        src = weights if weights is not None else model if model is not None else self._sender_model
        if src is None:
            raise ValueError("send() needs model=... or weights=... (or init_on_sender(model=...) first)")
        with self._send_lock:
            self._ensure_staging(src)
            flat = prepare_weights(self._buf.template, src)
            return self._buf.write(flat, version)

    @property
    def version(self) -> int:
        """Version of the last weights sent (0 before the first send)."""
        return 0 if self._buf is None else self._buf.version

    # -- server side -------------------------------------------------------------
    def init_on_receiver(self, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("init_on_receiver needs the served model")
        self._receiver_model = model
        self._live = weights_of(model)
        with self._send_lock:
            self._ensure_staging(model)
        try:
            prepare_weights(self._buf.template, self._live)
        except ValueError as e:
            raise ValueError(f"the served model does not match the weights this scheme carries: {e}") from None
        self._buf.attach_reader()
        self._seen = self._buf.seq()
        # weights sent before the server started are applied at its first batch
        if self._buf.version > 0:
            self._seen = -1

    def receive(self) -> int | None:
        """Server thread, between batches: apply the newest published set; its version or None."""
        buf = self._buf
        if buf is None:
            return None
        got = buf.take(self._seen)
        if got is None:
            return None
        views, version, seq = got
        copy_weights_(self._receiver_model, views, self._live)
        self._seen = seq
        return version

    def close_receiver(self) -> None:
        if self._buf is not None and self._receiver_model is not None:
            self._buf.detach_reader()
        self._receiver_model = None
        self._live = None

    # -- shared ------------------------------------------------------------------
    def _ensure_staging(self, src) -> None:
        if self._buf is None:
            template = prepare_weights(weights_of(src), src)  # flat {name: tensor}
            self._buf = TripleBuffer(template, self.device)

    def __getstate__(self):
        if self._buf is None:
            raise RuntimeError(
                f"{type(self).__name__} has no staging yet: call init_on_sender(model=...) "
                "before passing it to another process"
            )
        if mpc.get_spawning_popen() is None:
            raise RuntimeError(
                f"{type(self).__name__} can only be passed to a process as an argument of "
                "multiprocessing.Process(...) (its staging lives in shared memory)"
            )
        # the models stay behind: each process attaches its own
        return {"device": self.device, "_buf": self._buf}

    def __setstate__(self, state):
        self.__init__(state["device"])
        self._buf = state["_buf"]
