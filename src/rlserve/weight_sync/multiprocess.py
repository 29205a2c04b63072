"""MultiProcessWeightSyncScheme: weights from a trainer process to a server in another process."""
from __future__ import annotations

from .shared_mem import SharedMemWeightSyncScheme

__all__ = ["MultiProcessWeightSyncScheme"]


class MultiProcessWeightSyncScheme(SharedMemWeightSyncScheme):
    """Send weights to an :class:`~rlserve.InferenceServer` living in another process.

    The same newest-wins triple buffer as :class:`SharedMemWeightSyncScheme`,
    always staged in CPU shared memory so any process of the machine can map
    it whatever device the trainer and the server use (a CUDA trainer's send
    copies device-to-host; the server copies host-to-device between batches).
    Weights are never pickled per send: ``send`` costs one memory copy and
    the server's pick-up one more.

    Usage::

        scheme = MultiProcessWeightSyncScheme()
        scheme.init_on_sender(model=training_model)   # allocates the staging
        proc = mp.get_context("spawn").Process(target=serve, args=(scheme, ...))
        proc.start()   # serve() builds InferenceServer(..., weight_sync=scheme)
        ...
        scheme.send(model=training_model)              # returns the new version
    """

    def __init__(self):
        super().__init__(device=None)

    def __setstate__(self, state):
        self.__init__()
        self._buf = state["_buf"]
