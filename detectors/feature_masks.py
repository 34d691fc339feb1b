"""The feature-mask helpers live in the core (``xaibench.feature_masks``) so that outside
detectors use them without an internal module; the wrappers here import them by this path."""

from xaibench.feature_masks import check_masks, masks_to_layer

__all__ = ["check_masks", "masks_to_layer"]
