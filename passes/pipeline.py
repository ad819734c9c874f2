"""The rebirth pipeline: the slimming passes in the order they must run.

    mod = rebirth_pipeline(plan, weights)(mod)

1. StreamlineSlimming -- conv + pool/LRN/BN chains (and pools after a concat) become one
   strided conv each;
2. BranchSlimming -- inception modules lose their pool and 1x1 branches to wider convs. It
   runs second because it keeps each conv's geometry as StreamlineSlimming left it (a pool
   after a module makes that module's branch convs strided).

Both read the same plan and weights mapping ({key: array}; a loaded weights file is one,
checked against its plan by the tool before). Add ``tvm.relax.backend`` lowering after them
as for any Relax module. Importing this module also registers the slimming alone with Relax:

    mod = tvm.relax.get_pipeline("rebirth_slim", plan=plan, weights=weights)(mod)

(``"rebirth"`` is the full build pipeline -- slimming, then the tool's layout, schedules and
tuning records -- registered by ``tvm_rebirth.compile.pipeline``; passes import no tooling.)
"""

from __future__ import annotations

import tvm
from tvm.relax import pipeline as relax_pipeline

from .branch_slimming import BranchSlimming
from .streamline_slimming import StreamlineSlimming


def rebirth_pipeline(plan, weights, func_name: str = "main") -> tvm.transform.Pass:
    """All slimming passes for ``plan`` as one ``tvm.transform.Sequential``."""
    return tvm.transform.Sequential([
        StreamlineSlimming(plan, weights, func_name),
        BranchSlimming(plan, weights, func_name),
    ], name="rebirth_pipeline")


if "rebirth_slim" not in relax_pipeline.PIPELINE_MAP:
    relax_pipeline.register_pipeline("rebirth_slim")(rebirth_pipeline)
