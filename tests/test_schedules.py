"""GenericCpuSchedule on the fused PrimFuncs TVM makes of small Relax functions: it returns a
schedule where it should (None where it must), and the scheduled PrimFunc computes what the
unscheduled one computes, the same way every run (outputs are pre-filled with NaN, so an
element the schedule forgets to write, or writes from stale memory, shows up)."""

import pytest
import tvm
from tvm import relax, tirx
from tvm.relax import op as R

from tvm_rebirth.compile.build import host_target
from tvm_rebirth.compile.schedules import GenericCpuSchedule

from kernel_check import assert_schedule_matches

LLVM = host_target()  # this CPU's vector width, as the build uses


def _fused_prim_funcs(shapes, body):
    """Legalize and fuse ``body(*vars)`` (Relax ops on inputs of ``shapes``) the way the build
    does; return its PrimFuncs by name."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(shape, "float32"))
              for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(*params))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    return {gv.name_hint: func for gv, func in mod.functions.items()
            if isinstance(func, tirx.PrimFunc)}


def _the_prim_func(shapes, body):
    """The single fused PrimFunc of ``body`` (conv + bias + activation is one function)."""
    funcs = _fused_prim_funcs(shapes, body)
    assert len(funcs) == 1, sorted(funcs)
    return next(iter(funcs.values()))


def _conv(cin, cout, k, stride=1, groups=1, epilogue="bias_relu", hw=(13, 13), batch=1):
    """Input, weight (, bias) shapes and a conv2d body with the given epilogue."""
    shapes = [(batch, cin, *hw), (cout, cin // groups, k, k)]
    if epilogue != "none":
        shapes.append((1, cout, 1, 1))
    if epilogue == "bn_relu6":
        shapes.append((1, cout, 1, 1))

    def body(x, w, *rest):
        y = R.nn.conv2d(x, w, strides=stride, padding=k // 2, groups=groups)
        if epilogue == "none":
            return y
        if epilogue == "bn_relu6":  # a BatchNorm folded to scale and shift, then ReLU6
            return R.clip(R.add(R.multiply(y, rest[0]), rest[1]), 0.0, 6.0)
        y = R.add(y, rest[0])
        if epilogue == "bias_relu6":
            return R.clip(y, 0.0, 6.0)
        if epilogue == "bias_residual_relu":
            return R.nn.relu(R.add(y, x))
        return R.nn.relu(y) if epilogue == "bias_relu" else y

    return shapes, body


CONVS = {
    "1x1_16to96_w7_relu6": _conv(16, 96, 1, epilogue="bias_relu6", hw=(7, 7)),
    "1x1_16to96_w13_bn_relu6": _conv(16, 96, 1, epilogue="bn_relu6", hw=(13, 13)),
    "1x1_16to96_1x1_pixels": _conv(16, 96, 1, hw=(1, 1)),
    "1x1_96to16_no_epilogue": _conv(96, 16, 1, epilogue="none", hw=(7, 7)),
    "3x3_c3_w55": _conv(3, 16, 3, hw=(5, 55)),
    "3x3_w1": _conv(16, 16, 3, hw=(13, 1)),
    "3x3_to3_channels": _conv(16, 3, 3, hw=(7, 13)),
    "3x3_s2_no_epilogue": _conv(16, 96, 3, stride=2, epilogue="none", hw=(7, 7)),
    "3x3_residual": _conv(16, 16, 3, epilogue="bias_residual_relu", hw=(7, 7)),
    "3x3_batch2": _conv(16, 16, 3, hw=(7, 7), batch=2),
    "5x5_w13": _conv(16, 16, 5, hw=(13, 13)),
    "7x7_s2_c3": _conv(3, 16, 7, stride=2, hw=(23, 23)),
    "11x11_s4_c3": _conv(3, 16, 11, stride=4, hw=(27, 27)),
    "grouped_g4_16to96": _conv(16, 96, 3, groups=4, hw=(7, 13)),
    "depthwise_16_relu6": _conv(16, 16, 3, groups=16, epilogue="bias_relu6", hw=(13, 13)),
    "depthwise_96_s2": _conv(96, 96, 3, stride=2, groups=96, epilogue="bias_relu6",
                             hw=(7, 7)),
}

OTHERS = {
    "max_pool_3x3_s2_w55": ([(1, 16, 55, 55)], lambda x: R.nn.max_pool2d(x, 3, 2)),
    "max_pool_3x3_s2_w3": ([(1, 16, 3, 3)], lambda x: R.nn.max_pool2d(x, 3, 2)),
    "avg_pool_3x3_s1_pad": ([(1, 16, 13, 13)],
                            lambda x: R.nn.avg_pool2d(x, 3, 1, padding=1)),
    "avg_pool_5x5_s3": ([(1, 96, 13, 13)], lambda x: R.nn.avg_pool2d(x, 5, 3)),
    "global_avg_pool": ([(1, 96, 7, 7)], lambda x: R.nn.adaptive_avg_pool2d(x, 1)),
    "dense_bias_relu": ([(1, 96), (96, 13), (13,)],
                        lambda x, w, b: R.nn.relu(R.add(R.matmul(x, w), b))),
    "dense_batch4": ([(4, 55), (55, 7)], lambda x, w: R.matmul(x, w)),
    "softmax": ([(1, 13)], lambda x: R.nn.softmax(x)),
    "softmax_channels": ([(1, 16, 7, 7)], lambda x: R.nn.softmax(x, axis=1)),
    "sum_channels": ([(1, 16, 7, 13)], lambda x: R.sum(x, axis=[1], keepdims=True)),
    "lrn_like": ([(1, 16, 7, 7)], lambda x: R.divide(x, R.power(R.add(R.multiply(
        R.squeeze(R.nn.avg_pool3d(R.expand_dims(R.multiply(x, x), 1), (5, 1, 1),
                                  padding=(2, 0, 0, 2, 0, 0)), [1]),
        relax.const(1e-4)), relax.const(1.0)), relax.const(0.75)))),
    "add_relu": ([(1, 16, 13, 13), (1, 16, 1, 1)], lambda x, b: R.nn.relu(R.add(x, b))),
    "relu_w7": ([(7,)], lambda x: R.nn.relu(x)),
    "concat": ([(1, 16, 7, 7), (1, 3, 7, 7)], lambda x, y: R.concat([x, y], axis=1)),
    "transpose": ([(1, 16, 7, 13)], lambda x: R.permute_dims(x, [0, 2, 3, 1])),
}


def _assert_same_numerics(func):
    return assert_schedule_matches(func, GenericCpuSchedule(), LLVM)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_schedule_matches_unscheduled(name):
    sch = _assert_same_numerics(_the_prim_func(*CONVS[name]))
    # every conv here has a spatial tile to keep in registers: the accumulator is local
    assert '"local"' in sch.mod.script()


@pytest.mark.parametrize("name", list(OTHERS))
def test_schedule_matches_unscheduled(name):
    for func in _fused_prim_funcs(*OTHERS[name]).values():  # LRN: three functions
        _assert_same_numerics(func)


def test_scalar_function_is_left_to_tvm():
    """A 0-d PrimFunc has no loop to parallelise or vectorise: the rule does not apply."""
    func = _the_prim_func([()], lambda x: R.nn.relu(x))
    assert GenericCpuSchedule().apply(func, LLVM, False) is None


def test_non_cpu_target_is_left_to_other_rules():
    func = _the_prim_func(*CONVS["3x3_w1"])
    assert GenericCpuSchedule().apply(func, tvm.target.Target("cuda"), False) is None


def test_epilogue_chain_check_reads_tvm_027_regions():
    """_register_plan's chain check (an epilogue block reads its producer through exactly one
    access) on TVM 0.27's access regions, whose buffer is ``region.source`` (there is no
    ``region.buffer``: the check raised AttributeError on every un-inlined epilogue chain)."""
    from tvm import s_tir

    from tvm_rebirth.compile.schedules import _reads_one_buffer_of

    func = _the_prim_func(*CONVS["3x3_residual"])  # pad, conv, bias add, residual add, relu
    sch = s_tir.Schedule(func.with_attr("global_symbol", "main"))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    assert names[:2] == ["pad_temp", "conv2d_nchw"], names
    bias, residual = blocks[2], blocks[3]
    assert _reads_one_buffer_of(sch, blocks[4], residual)  # relu reads the residual sum once
    assert _reads_one_buffer_of(sch, residual, bias)  # (and x, a parameter, not a block)
    assert not _reads_one_buffer_of(sch, blocks[4], bias)  # relu's producer is not the bias
