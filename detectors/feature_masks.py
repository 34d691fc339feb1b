"""The feature-mask helpers live in the core, ``xaibench.feature_masks`` (outside detectors
use them without an internal module); this path keeps older imports working."""

from xaibench.feature_masks import check_masks, masks_to_layer

__all__ = ["check_masks", "masks_to_layer"]
