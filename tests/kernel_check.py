"""Scheduled vs unscheduled: a schedule rule's PrimFunc must compute what TVM's plain lowering
of the same PrimFunc computes, write every output element, and give the same result twice."""

import numpy as np
import tvm


def run_with_nan_output(lib, func, seed):
    """Run ``lib`` on random inputs; the output (the last parameter) starts as NaN, so an
    element the kernel never writes shows up."""
    rng = np.random.default_rng(seed)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape])
                               .astype(str(p.ty.dtype))) for p in func.params]
    out = args[-1]
    out.copyfrom(np.full(out.shape, np.nan, dtype=str(out.dtype)))
    lib["main"](*args)
    return out.numpy()


def assert_schedule_matches(func, rule, target, atol=1e-4):
    """Schedule ``func`` with ``rule`` for ``target`` and check it against the unscheduled
    PrimFunc on two seeds, each scheduled run twice; returns the schedule."""
    func = func.with_attr("global_symbol", "main")
    sch = rule.apply(func, target, False)
    assert sch is not None
    build = lambda f: tvm.tirx.build(tvm.IRModule({"main": f}), target=target)  # noqa: E731
    reference, scheduled = build(func), build(sch.mod["main"])
    for seed in (0, 1):
        want = run_with_nan_output(reference, func, seed)
        first = run_with_nan_output(scheduled, func, seed)
        second = run_with_nan_output(scheduled, func, seed)
        assert not np.isnan(first).any(), "an output element was never written"
        np.testing.assert_allclose(first, want, rtol=1e-4, atol=atol)
        np.testing.assert_array_equal(first, second)
    return sch
