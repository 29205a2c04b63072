"""Weight synchronisation: trainer-side ``send``, server-side ``receive`` between batches."""
from .base import WeightSyncScheme, copy_weights_, prepare_weights, weights_of

__all__ = ["WeightSyncScheme", "copy_weights_", "prepare_weights", "weights_of"]
