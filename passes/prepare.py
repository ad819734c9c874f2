"""PrepareForSites: the canonical form every site analysis reads, whatever ran before.

Importers and earlier passes leave bindings that hide a chain: trivial ``y = x`` rebindings,
tuples built only to be indexed (``DecomposeOpsForInference`` turns a BatchNorm into
arithmetic plus a dead ``(out, mean, var)`` tuple whose unused fields still count as readers of
the chain's tensor), and unused bindings. This pass runs TVM's ``CanonicalizeBindings`` and
removes every unused binding of ``func_name``, so a chain is the same chain before or after
such passes::

    lv5 = R.add(lv4, beta)                      lv5 = R.add(lv4, beta)
    lv6 = (lv5, mean, var)            ->        lv8 = R.nn.avg_pool2d(lv5, ...)
    lv7 = lv6[0]
    lv8 = R.nn.avg_pool2d(lv7, ...)

ONNX ``Clip`` imported as call_tir max/min becomes ``R.clip`` again (``LiftClips``), and
explicit constant pads before convs and pools become their padding (``AbsorbPads``).
``analysis.analyze_sites`` applies it first; the slimming passes rewrite the prepared module.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from .absorb_pads import AbsorbPads
from .lift_clips import LiftClips


@tvm.transform.module_pass(opt_level=0, name="PrepareForSites")
class PrepareForSites:
    """Canonicalise bindings and remove dead code in ``mod[func_name]``.

    Parameters
    ----------
    func_name : str
        The function to prepare; other functions are left as they are.
    """

    def __init__(self, func_name: str = "main"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        func = mod[self.func_name]
        if not isinstance(func, relax.Function):
            return mod
        gvar = mod.get_global_var(self.func_name)
        single = tvm.IRModule({gvar: func})
        canonical = relax.transform.CanonicalizeBindings()(single)[self.func_name]
        prepared = relax.analysis.remove_all_unused(canonical)
        if not tvm_ffi.structural_equal(prepared, func):
            mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
            mod[self.func_name] = prepared
        # keeps the very vars the caller holds when there is nothing to do
        return AbsorbPads(self.func_name)(LiftClips(self.func_name)(mod))
