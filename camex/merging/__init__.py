"""Pure tensor maths of expert merging (SPEC §2-4): no modules, models, data or configs."""

from camex.merging.curvature import kronecker_apply, nearest_factors
from camex.merging.masks import (
    dare_element_mask,
    dare_expert_mask,
    ties_elect_sign,
    ties_mask,
    ties_merge,
)
from camex.merging.merge import domain_vectors, merge_flat, merged_linear

__all__ = [
    "dare_element_mask",
    "dare_expert_mask",
    "domain_vectors",
    "kronecker_apply",
    "merge_flat",
    "merged_linear",
    "nearest_factors",
    "ties_elect_sign",
    "ties_mask",
    "ties_merge",
]
