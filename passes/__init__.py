"""tvm-rebirth's Relax passes: pure IRModule analyses and rewrites, no I/O, no tooling.

    AttachLayerNames     source layer names on the vars (site ids stay stable)
    PrepareForSites      canonical bindings, no dead code, ONNX Clip as R.clip (LiftClips),
                         explicit pads absorbed (AbsorbPads): what every analysis reads
    FindRebirthSites     annotate the module with its sites (analyze_sites: as objects)
    StreamlineSlimming   conv + pool/LRN/BN chains -> one strided conv
    BranchSlimming       inception branches -> fewer, wider convs
    MergeParallelConvs   1x1 convs sharing an input -> one wide conv + split
    rebirth_pipeline     the slimming passes in order
"""

from .absorb_pads import AbsorbPads
from .analysis import SiteAnalysis, analyze_sites, block_difference, match_site
from .attach_layer_names import AttachLayerNames
from .branch_slimming import BranchSlimming
from .dataflow import Dataflow, evaluate_constant
from .errors import RebirthError
from .exact_merge import exact_site_weights
from .find_rebirth_sites import FindRebirthSites, find_rebirth_sites
from .lift_clips import LiftClips
from .merge_parallel_convs import MergeParallelConvs
from .pipeline import rebirth_pipeline
from .prepare import PrepareForSites
from .site import (BRANCH_WIDTHS, KERNEL_POLICIES, SITE_KINDS, Absorb, Branch, ConvSpec,
                   RebirthSite, branch_conv_layout, branch_groups, refit_keys,
                   site_conv_weights, weight_keys)
from .streamline_slimming import StreamlineSlimming
from .traces import BranchTrace, ConvBlock, PoolSpec, Step, StreamlineTrace

__all__ = ["AttachLayerNames", "AbsorbPads", "LiftClips", "PrepareForSites", "FindRebirthSites", "find_rebirth_sites", "analyze_sites",
           "SiteAnalysis", "block_difference", "match_site", "StreamlineSlimming",
           "BranchSlimming", "MergeParallelConvs", "rebirth_pipeline", "exact_site_weights",
           "Dataflow", "evaluate_constant", "RebirthError", "ConvSpec", "RebirthSite", "Branch",
           "Absorb", "weight_keys", "refit_keys", "site_conv_weights", "branch_groups",
           "branch_conv_layout", "StreamlineTrace", "BranchTrace", "ConvBlock", "PoolSpec",
           "Step", "KERNEL_POLICIES", "SITE_KINDS", "BRANCH_WIDTHS"]
