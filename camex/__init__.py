"""camex: curvature-aware merging of experts (CAMEx, ICLR 2025), reproduced."""

from camex.upcycle import upcycle
from camex.variants import MergeVariant, MoEOptions, get_variant, list_variants

__all__ = ["MergeVariant", "MoEOptions", "get_variant", "list_variants", "upcycle"]
__version__ = "0.1.0"
