"""The rebirth rewrite as one module pass for your own ``tvm.transform.Sequential``.

    mod = tvm_rebirth.transform.Rebirth(plan, weights)(mod)

``Rebirth`` is ``passes.rebirth_pipeline`` (StreamlineSlimming, then BranchSlimming) behind
the tool's own check: weights loaded from a file must have been learned for this plan
(its sha256) and hold every enabled site's arrays in the plan's shapes.
"""

from __future__ import annotations

import tvm

from .learn.weights import RebirthWeights
from .passes import rebirth_pipeline


@tvm.transform.module_pass(opt_level=0, name="Rebirth")
class Rebirth:
    """Slim every enabled site of ``plan`` with ``weights``.

    Parameters
    ----------
    plan : RebirthPlan
        Where and how to slim.
    weights : RebirthWeights or Mapping[str, numpy.ndarray]
        The learned arrays; a RebirthWeights is checked against ``plan`` first.
    func_name : str
        The function to rewrite.
    """

    def __init__(self, plan, weights, func_name: str = "main"):
        self.plan, self.weights, self.func_name = plan, weights, func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        if isinstance(self.weights, RebirthWeights):
            self.weights.check(self.plan)
        return rebirth_pipeline(self.plan, self.weights, self.func_name)(mod)
