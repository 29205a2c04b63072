"""Weight synchronisation: trainer-side ``send``, server-side ``receive`` between batches."""
from .base import NoWeightSyncScheme, WeightSyncScheme, copy_weights_, prepare_weights, snapshot_weights, weights_of

__all__ = ["NoWeightSyncScheme", "WeightSyncScheme", "copy_weights_", "prepare_weights", "snapshot_weights", "weights_of"]
