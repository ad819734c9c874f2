"""tvm-rebirth's Relax passes: pure IRModule analyses and rewrites, no I/O."""

from .find_rebirth_sites import FindRebirthSites, find_rebirth_sites
from .site import KERNEL_POLICIES, SITE_KINDS, ConvSpec, RebirthSite

__all__ = ["FindRebirthSites", "find_rebirth_sites", "ConvSpec", "RebirthSite",
           "KERNEL_POLICIES", "SITE_KINDS"]
