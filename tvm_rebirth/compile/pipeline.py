"""The registered Relax pipeline ``"rebirth"``: slim, then build with the tool's layout,
schedule rules and tuning records, so that a TVM user compiles a rebirth model with
``tvm.compile``::

    import tvm, tvm_rebirth
    from tvm import relax

    ex = tvm.compile(mod, target, relax_pipeline=relax.get_pipeline(
        "rebirth", plan=plan, weights=weights))
    vm = relax.VirtualMachine(ex, tvm.cpu())

Names: ``"rebirth"`` (this module, registered when ``tvm_rebirth`` is imported) is the full
pipeline: ``passes.rebirth_pipeline`` (slimming), then ``compile.build.build_passes`` for the
target ``relax.build`` enters (the target's tuning_logs, our conv kernels, the generic CPU
schedule). ``"rebirth_slim"`` (``passes/pipeline.py``) is the slimming alone, an IRModule ->
IRModule pass for your own pipeline; ``plan=None`` here builds the module unslimmed with the
same schedules (the "original" side of a comparison).
"""

from __future__ import annotations

import tvm
from tvm.relax import pipeline as relax_pipeline

from ..errors import RebirthError
from ..transform import Rebirth
from .build import build_passes

PIPELINE_NAME = "rebirth"


def rebirth_build_pipeline(plan=None, weights=None, target=None, tuned=True,
                           func_name: str = "main") -> tvm.transform.Pass:
    """Slimming (when ``plan`` is given) + the tool's build passes, as one module pass.

    Parameters
    ----------
    plan : RebirthPlan or None
        Where and how to slim; None builds the module as it is.
    weights : Mapping[str, numpy.ndarray] or None
        The plan's learned arrays (``tvm_rebirth.finetune``); a RebirthWeights is checked
        against ``plan``.
    target : tvm.target.Target, str, dict or None
        None: the target ``tvm.compile`` / ``relax.build`` enters (``Target.current()``).
    tuned : bool or MetaSchedule Database
        True applies the target's tuning_logs records, False none.
    func_name : str
        The function to slim.
    """

    if plan is not None and weights is None:
        raise RebirthError("relax.get_pipeline('rebirth'): a plan needs its weights "
                           "(weights=tvm_rebirth.finetune(mod, plan, images))")

    @tvm.transform.module_pass(opt_level=0, name="RebirthBuildPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from .targets import resolve_target

        build_target = resolve_target(target) if target is not None else \
            tvm.target.Target.current(allow_none=True)
        if build_target is None:
            build_target = resolve_target("host")
        if plan is not None:
            mod = Rebirth(plan, weights, func_name)(mod)
        with tvm.transform.PassContext(opt_level=3), build_target:
            return build_passes(build_target, tuned)(mod)

    return _pipeline


if PIPELINE_NAME not in relax_pipeline.PIPELINE_MAP:
    relax_pipeline.register_pipeline(PIPELINE_NAME)(rebirth_build_pipeline)
