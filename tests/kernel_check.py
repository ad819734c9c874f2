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


def conv_module(cin, cout, k, stride=1, pad=None, hw=(13, 13), epilogue="bias_relu", groups=1,
                dilation=1, seed=0):
    """A Relax module: conv2d with constant weights (+ epilogue: "bias", "bias_relu",
    "bias_relu6", "bn_relu" or "none") on an input parameter."""
    from tvm import relax
    from tvm.relax import op as R

    rng = np.random.default_rng(seed)
    pad = k // 2 if pad is None else pad
    weight = rng.standard_normal((cout, cin // groups, k, k)).astype("float32")
    bias = rng.standard_normal((1, cout, 1, 1)).astype("float32")
    x = relax.Var("x", relax.TensorType((1, cin, *hw), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, relax.const(weight), strides=stride, padding=pad,
                                    dilation=dilation, groups=groups))
            if epilogue in ("bias_relu", "bias_relu6", "bias"):
                y = bb.emit(R.add(y, relax.const(bias)))
            if epilogue == "bias_relu":
                y = bb.emit(R.nn.relu(y))
            if epilogue == "bias_relu6":
                y = bb.emit(R.clip(y, 0.0, 6.0))
            if epilogue == "bn_relu":
                scale = rng.standard_normal((1, cout, 1, 1)).astype("float32")
                y = bb.emit(R.nn.relu(R.add(R.multiply(y, relax.const(scale)),
                                            relax.const(bias))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def packed_prim_funcs(mod, target, block_channels=False):
    """The fused PrimFuncs of ``mod`` after our conv rewrite (PackConvWeights, after
    BlockChannels if ``block_channels``), legalization and fusion, unscheduled, each named
    "main"."""
    from tvm import relax, tirx

    from tvm_rebirth.compile.channel_blocks import BlockChannels
    from tvm_rebirth.compile.pack_convs import PackConvWeights

    blocking = [BlockChannels(target)] if block_channels else []
    with target:
        mod = tvm.transform.Sequential([
            *blocking, PackConvWeights(target), relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    return [func.with_attr("global_symbol", "main") for _, func in mod.functions.items()
            if isinstance(func, tirx.PrimFunc)]
