"""The rebirth pipeline: the slimming passes in the order they must run.

    mod = rebirth_pipeline(plan, weights)(mod)

1. StreamlineSlimming -- conv + pool/LRN/BN chains (and pools after a concat) become one
   strided conv each;
2. BranchSlimming -- inception modules lose their pool and 1x1 branches to wider convs. It
   runs second because it keeps each conv's geometry as StreamlineSlimming left it (a pool
   after a module makes that module's branch convs strided).

Both read the same plan and weights file. Add ``tvm.relax.backend`` lowering after them as
for any Relax module.
"""

from __future__ import annotations

import tvm

from .branch_slimming import BranchSlimming
from .streamline_slimming import StreamlineSlimming


def rebirth_pipeline(plan, weights, func_name: str = "main") -> tvm.transform.Pass:
    """All slimming passes for ``plan`` as one ``tvm.transform.Sequential``."""
    return tvm.transform.Sequential([
        StreamlineSlimming(plan, weights, func_name),
        BranchSlimming(plan, weights, func_name),
    ], name="rebirth_pipeline")
