"""tvm-rebirth's Relax passes: pure IRModule analyses and rewrites, no I/O."""

from .branch_slimming import BranchSlimming
from .exact_merge import exact_site_weights
from .find_rebirth_sites import FindRebirthSites, find_rebirth_sites
from .site import KERNEL_POLICIES, SITE_KINDS, ConvSpec, RebirthSite, weight_keys
from .merge_parallel_convs import MergeParallelConvs
from .pipeline import rebirth_pipeline
from .streamline_slimming import StreamlineSlimming

__all__ = ["FindRebirthSites", "find_rebirth_sites", "StreamlineSlimming", "BranchSlimming",
           "rebirth_pipeline", "MergeParallelConvs",
           "exact_site_weights", "ConvSpec", "RebirthSite", "weight_keys",
           "KERNEL_POLICIES", "SITE_KINDS"]
