"""Compiling a Relax module for a CPU target and running it."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .errors import RebirthError


def host_target():
    """The machine's own CPU as a dict target (flag strings are rejected by TVM 0.27)."""
    import tvm
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu() if hasattr(codegen, "llvm_get_system_cpu") else "generic"
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu,
                              "num-cores": int(os.environ.get("TVM_NUM_THREADS", "2"))})


def cpu_pipeline(target):
    """Relax -> VM pipeline: TVM's CPU passes with our generic schedule after fusion."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    from .schedules import GenericCpuSchedule

    @tvm.transform.module_pass(opt_level=0, name="RebirthCpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [dlight.ApplyDefaultSchedule(GenericCpuSchedule())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target))
            return seq(mod)

    return _pipeline


def compile_module(mod, target=None):
    """Build ``mod`` into a VM executable for ``target`` (default: this host's CPU)."""
    import tvm
    from tvm import relax

    target = target or host_target()
    with tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))


class Runner:
    """A built module on the local CPU: ``runner(x) -> list of numpy outputs``."""

    def __init__(self, mod, target=None, func_name="main"):
        import tvm
        from tvm import relax

        t = time.time()
        self.executable = compile_module(mod, target)
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
