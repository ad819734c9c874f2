"""BlockChannels: activations between our convs in NCHW[x]c (x = the target's lanes), layout
copies only where an op cannot follow; no-op cases kept; every scheduled conv PrimFunc with
blocked input or output matches the unscheduled one; a network built with blocked
activations matches the build without our kernels."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax import op as R

from tvm_rebirth.compile.build import Runner, host_target
from tvm_rebirth.compile.channel_blocks import BlockChannels
from tvm_rebirth.compile.conv_rules import ConvRule

from kernel_check import assert_schedule_matches, packed_prim_funcs

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512",
                            "mtriple": "x86_64-linux-gnu"})
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # SSE: 4 fp32 lanes
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                             "mattr": ["+neon"]})

RNG = np.random.default_rng(0)


def _const(*shape):
    return relax.const(RNG.standard_normal(shape).astype("float32"))


def verify(before, expected, target=AVX512):
    with target:
        tvm.ir.assert_structural_equal(BlockChannels(target)(before), expected)


def _module(body, in_channels=16, hw=(8, 8)):
    """A Relax module whose dataflow block is ``body(bb, x)`` (returns the output)."""
    x = relax.Var("x", relax.TensorType((1, in_channels, *hw), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _to_blocks(bb, x, lanes=16):
    return bb.emit(R.layout_transform(x, index_map=lambda n, c, h, w: (n, c // lanes, h, w,
                                                                       c % lanes)))


def _from_blocks(bb, x, lanes=16):
    return bb.emit(R.layout_transform(x, index_map=lambda n, c, h, w, lane: (n, c * lanes + lane,
                                                                             h, w)))


W1, W2, W24 = _const(32, 16, 3, 3), _const(16, 32, 1, 1), _const(24, 32, 1, 1)
BIAS = RNG.standard_normal((1, 32, 1, 1)).astype("float32")
BLOCKED_BIAS = relax.const(BIAS.reshape(1, 2, 16, 1, 1).transpose(0, 1, 3, 4, 2).copy())


def _conv(x, weight, data="NCHW", out="NCHW", padding=0):
    return R.nn.conv2d(x, weight, padding=padding, data_layout=data, kernel_layout="OIHW",
                       out_layout=out)


HALF = relax.const(0.5, "float32")


def test_conv_chain_is_blocked_up_to_the_conv_that_reads_it():
    before = _module(lambda bb, x: bb.emit(_conv(bb.emit(R.multiply(bb.emit(R.nn.relu(bb.emit(
        R.add(bb.emit(_conv(x, W1, padding=1)), relax.const(BIAS))))), HALF)), W2)))
    expected = _module(lambda bb, x: bb.emit(_conv(bb.emit(R.multiply(bb.emit(R.nn.relu(bb.emit(
        R.add(bb.emit(_conv(x, W1, out="NCHW16c", padding=1)), BLOCKED_BIAS)))), HALF)), W2,
        data="NCHW16c")))
    verify(before, expected)


def test_non_follower_reads_one_copy_and_a_plain_tensor_is_blocked_for_a_binary_op():
    def before_body(bb, x):
        y = bb.emit(R.nn.relu(bb.emit(_conv(x, W1, padding=1))))
        s1 = bb.emit(R.nn.softmax(y, axis=1))
        s2 = bb.emit(R.nn.softmax(y, axis=2))
        return bb.emit(_conv(bb.emit(R.add(y, bb.emit(R.add(s1, s2)))), W2))

    def expected_body(bb, x):
        y = bb.emit(R.nn.relu(bb.emit(_conv(x, W1, out="NCHW16c", padding=1))))
        plain = _from_blocks(bb, y)
        s1 = bb.emit(R.nn.softmax(plain, axis=1))
        s2 = bb.emit(R.nn.softmax(plain, axis=2))
        s = bb.emit(R.add(s1, s2))
        return bb.emit(_conv(bb.emit(R.add(y, _to_blocks(bb, s))), W2, data="NCHW16c"))

    verify(_module(before_body), _module(expected_body))


def test_concat_blocks_its_plain_fields_and_pools_follow():
    def before_body(bb, x):
        y = bb.emit(_conv(x, W1, padding=1))
        p = bb.emit(R.nn.max_pool2d(bb.emit(R.concat([y, x], axis=1)), [3, 3], padding=1))
        return bb.emit(_conv(p, _const(16, 48, 1, 1)))

    def expected_body(bb, x):
        y = bb.emit(_conv(x, W1, out="NCHW16c", padding=1))
        c = bb.emit(R.concat([y, _to_blocks(bb, x)], axis=1))
        p = bb.emit(R.nn.max_pool2d(c, [3, 3], padding=1, layout="NCHW16c",
                                    out_layout="NCHW16c"))
        return bb.emit(_conv(p, _const(16, 48, 1, 1), data="NCHW16c"))

    global RNG
    RNG = np.random.default_rng(1)
    before = _module(before_body)
    RNG = np.random.default_rng(1)
    expected = _module(expected_body)
    verify(before, expected)


def test_no_op_cases():
    # 24 output channels: no whole number of blocks
    odd = _module(lambda bb, x: bb.emit(_conv(bb.emit(_conv(x, W24)), _const(16, 24, 1, 1))),
                  in_channels=32)
    # a conv whose output only reaches the function's output
    alone = _module(lambda bb, x: bb.emit(R.nn.relu(bb.emit(_conv(x, W1, padding=1)))))
    for mod in (odd, alone):
        verify(mod, mod)
    chain = _module(lambda bb, x: bb.emit(_conv(bb.emit(_conv(x, W1, padding=1)), W2)))
    verify(chain, chain, target=AARCH64)  # NEON's kernels read NCHW rows as vectors


CHAINS = {  # name: (cin, mid, cout, k1, stride1, hw, residual)
    "3x3_then_1x1_w13": (16, 32, 16, 3, 1, (13, 13), False),
    "1x1_pair_w27_residual": (32, 64, 64, 1, 1, (6, 27), True),
    "3x3_s2_48_then_1x1": (16, 48, 16, 3, 2, (15, 15), False),
}


def _chain(cin, mid, cout, k, stride, hw, residual):
    """conv -> bias -> relu -> 1x1 conv (-> + the first conv's output -> relu) -> 1x1 conv:
    the middle conv reads and writes NCHW[x]c."""
    def body(bb, x):
        y = bb.emit(R.nn.relu(bb.emit(R.add(bb.emit(R.nn.conv2d(
            x, _const(mid, cin, k, k), strides=stride, padding=k // 2)), _const(1, mid, 1, 1)))))
        z = bb.emit(R.nn.conv2d(y, _const(cout, mid, 1, 1)))
        if residual:
            z = bb.emit(R.nn.relu(bb.emit(R.add(z, y))))
        return bb.emit(R.nn.conv2d(z, _const(16, cout, 1, 1)))
    return _module(body, in_channels=cin, hw=hw)


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("target", [host_target(), FOUR_LANES], ids=["host", "4_lanes"])
def test_blocked_convs_match_unscheduled(name, target):
    funcs = packed_prim_funcs(_chain(*CHAINS[name]), target, block_channels=True)
    blocked = [f for f in funcs if any(len(p.ty.shape) == 5 for p in f.params)]
    assert len(blocked) == 3  # each conv reads or writes NCHW[x]c
    for func in blocked:
        assert_schedule_matches(func, ConvRule(), target, atol=1e-3)


def test_network_matches_build_without_kernels(monkeypatch):
    """Convs, pools, a concat with a plain field, a residual add, an op that cannot follow
    (softmax over channels) and global pooling + dense, built for this host."""
    def body(bb, x):
        y = bb.emit(R.nn.relu(bb.emit(R.add(bb.emit(R.nn.conv2d(x, _const(32, 16, 3, 3),
                                                                padding=1)),
                                            _const(1, 32, 1, 1)))))
        p = bb.emit(R.nn.max_pool2d(y, [3, 3], strides=[2, 2], padding=1))
        c = bb.emit(R.concat([p, bb.emit(R.nn.avg_pool2d(x, [2, 2], strides=[2, 2]))], axis=1))
        z = bb.emit(R.nn.relu(bb.emit(R.nn.conv2d(c, _const(48, 48, 1, 1)))))
        r = bb.emit(R.nn.relu(bb.emit(R.add(bb.emit(R.nn.conv2d(z, _const(48, 48, 3, 3),
                                                                padding=1)), z))))
        s = bb.emit(R.nn.softmax(r, axis=1))
        q = bb.emit(R.nn.conv2d(bb.emit(R.multiply(s, r)), _const(32, 48, 1, 1)))
        g = bb.emit(R.mean(q, axis=[2, 3]))
        return bb.emit(R.matmul(g, _const(32, 10)))

    mod = _module(body, hw=(12, 12))
    x = np.random.default_rng(5).standard_normal((1, 16, 12, 12)).astype("float32")
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "0")
    want = Runner(mod, tuned=False)(x)[0]
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "1")
    got = Runner(mod, tuned=False)(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
