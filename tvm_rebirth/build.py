"""Compiling a Relax module for a CPU target and running it."""

from __future__ import annotations

import os
import time

import numpy as np

from .errors import RebirthError


def host_target():
    """The machine's own CPU as a dict target (flag strings are rejected by TVM 0.27)."""
    from .targets import resolve_target

    return resolve_target("host")


def _passes(target):
    """(up to memory planning, the rest): TVM's CPU passes with our schedule after fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    from .schedules import GenericCpuSchedule

    finalize = cpu_generic.finalize_passes(target)  # starts with StaticPlanBlockMemory
    planned = (cpu_generic.library_dispatch_passes(target)
               + cpu_generic.legalize_passes(target)
               + [dlight.ApplyDefaultSchedule(GenericCpuSchedule())]
               + cpu_generic.dataflow_lower_passes(target) + finalize[:1])
    return planned, finalize[1:]


def planned_activation_bytes(planned_mod, func_name="main") -> int:
    """Bytes of the storage blocks TVM's static memory planner allocates for ``main``."""
    from tvm import relax

    total = 0

    def visit(expr):
        nonlocal total
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == \
                "relax.memory.alloc_storage":
            total += int(expr.args[0].values[0])

    relax.analysis.post_order_visit(planned_mod[func_name], visit)
    return total


def compile_module(mod, target=None):
    """Build ``mod`` for ``target`` (default: this host's CPU).

    Returns (VM executable, planned activation bytes after static memory planning)."""
    import tvm
    from tvm import relax

    target = target or host_target()
    before, after = _passes(target)
    with tvm.transform.PassContext(opt_level=3), target:
        planned = tvm.transform.Sequential(before)(mod)
        memory = planned_activation_bytes(planned)
        lowered = tvm.transform.Sequential(after)(planned)
        return relax.build(lowered, target=target, relax_pipeline=None), memory


class Runner:
    """A built module on the local CPU: ``runner(x) -> list of numpy outputs``."""

    def __init__(self, mod, target=None, func_name="main"):
        import tvm
        from tvm import relax

        t = time.time()
        self.executable, self.planned_bytes = compile_module(mod, target)
        self.build_seconds = time.time() - t
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(self.executable, self.device)
        self.func_name = func_name

    def __call__(self, *inputs):
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(x), self.device) for x in inputs]
        out = self.vm[self.func_name](*args)
        return _to_numpy(out)


def _to_numpy(out):
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(_to_numpy(item))
    return result


def export_library(executable, path, target) -> None:
    """Write a deployable shared library; aarch64 targets link with the cross compiler.
    Written to a temporary name first, so a failed build leaves no half-written file."""
    import shutil

    from .targets import CROSS_COMPILER, is_cross

    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}.so")
    kwargs = {}
    if is_cross(target):
        if shutil.which(CROSS_COMPILER) is None:
            raise RebirthError(f"{CROSS_COMPILER} not found: install it with "
                               "`apt-get install g++-aarch64-linux-gnu`")
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(CROSS_COMPILER)
    try:
        executable.export_library(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
