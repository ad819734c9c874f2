"""Small real ONNX models for tests: conv chains in every order, fan-out, groups, inception."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphMaker:
    """Builds an ONNX graph node by node with seeded weights and BVLC-like names."""

    def __init__(self, shape=(1, 3, 32, 32), seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = list(shape)
        self.input = helper.make_tensor_value_info("data", TensorProto.FLOAT, self.shape)
        self.channels = {"data": shape[1]}

    def _const(self, name, array):
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x, name, out, k=3, s=1, p=None, group=1, bias=True):
        cin = self.channels[x]
        p = k // 2 if p is None else p
        fan_in = cin // group * k * k
        w = self._const(f"{name}_w", self.rng.standard_normal((out, cin // group, k, k))
                        * np.sqrt(2.0 / fan_in))
        inputs = [x, w]
        if bias:
            inputs.append(self._const(f"{name}_b", self.rng.standard_normal(out) * 0.1))
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, kernel_shape=[k, k],
                                           strides=[s, s], pads=[p] * 4, group=group))
        self.channels[name] = out
        return name

    def _unary(self, op, x, name, **attrs):
        self.nodes.append(helper.make_node(op, [x], [name], name=name, **attrs))
        self.channels[name] = self.channels[x]
        return name

    def relu(self, x, name):
        return self._unary("Relu", x, name)

    def maxpool(self, x, name, k=3, s=2, p=0, ceil=0):
        return self._unary("MaxPool", x, name, kernel_shape=[k, k], strides=[s, s],
                           pads=[p] * 4, ceil_mode=ceil)

    def avgpool(self, x, name, k=2, s=2, p=0):
        return self._unary("AveragePool", x, name, kernel_shape=[k, k], strides=[s, s],
                           pads=[p] * 4)

    def lrn(self, x, name):
        return self._unary("LRN", x, name, size=5, alpha=1e-4, beta=0.75, bias=1.0)

    def bn(self, x, name):
        c = self.channels[x]
        ins = [x] + [self._const(f"{name}_{t}", v) for t, v in [
            ("s", self.rng.uniform(0.5, 1.5, c)), ("b", self.rng.standard_normal(c) * 0.1),
            ("m", self.rng.standard_normal(c) * 0.1), ("v", self.rng.uniform(0.5, 1.5, c))]]
        self.nodes.append(helper.make_node("BatchNormalization", ins, [name], name=name,
                                           epsilon=1e-5))
        self.channels[name] = c
        return name

    def concat(self, xs, name):
        self.nodes.append(helper.make_node("Concat", list(xs), [name], name=name, axis=1))
        self.channels[name] = sum(self.channels[x] for x in xs)
        return name

    def add(self, a, b, name):
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        self.channels[name] = self.channels[a]
        return name

    def model(self, outputs):
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "test", [self.input], outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model

    def save(self, path, outputs):
        onnx.save(self.model(outputs), str(path))
        return str(path)


CHAIN_OPS = {
    "relu": lambda g, x, i: g.relu(x, f"relu{i}"),
    "max_pool2d": lambda g, x, i: g.maxpool(x, f"pool{i}"),
    "avg_pool2d": lambda g, x, i: g.avgpool(x, f"ave{i}"),
    "lrn": lambda g, x, i: g.lrn(x, f"norm{i}"),
    "batch_norm": lambda g, x, i: g.bn(x, f"bn{i}"),
}


def chain_model(path, ops, k=3, group=1, shape=(1, 4, 32, 32)):
    """data -> conv1 -> ops... -> conv_tail; returns the model path."""
    g = GraphMaker(shape)
    x = g.conv("data", "conv1", 8, k=k, group=group)
    for i, op in enumerate(ops):
        x = CHAIN_OPS[op](g, x, i + 1)
    tail = g.conv(x, "tail", 4, k=1)
    return g.save(path, [tail])


def inception_model(path, shape=(1, 16, 28, 28), pool_after=True):
    """A GoogLeNet-style inception module (1x1 | 3x3 | 5x5 | pool->proj) + stride-2 pool."""
    g = GraphMaker(shape)
    x = g.relu(g.conv("data", "stem", 24, k=3), "stem/relu")
    b1 = g.relu(g.conv(x, "inc/1x1", 8, k=1), "inc/relu_1x1")
    b2 = g.relu(g.conv(g.relu(g.conv(x, "inc/3x3_reduce", 12, k=1), "inc/relu_3r"),
                       "inc/3x3", 16, k=3), "inc/relu_3x3")
    b3 = g.relu(g.conv(g.relu(g.conv(x, "inc/5x5_reduce", 4, k=1), "inc/relu_5r"),
                       "inc/5x5", 6, k=5), "inc/relu_5x5")
    b4 = g.relu(g.conv(g.maxpool(x, "inc/pool", k=3, s=1, p=1), "inc/pool_proj", 6, k=1),
                "inc/relu_pp")
    out = g.concat([b1, b2, b3, b4], "inc/output")
    if pool_after:
        out = g.maxpool(out, "pool3/3x3_s2", k=3, s=2)
    tail = g.conv(out, "tail", 4, k=1)
    return g.save(path, [tail])


# --------------------------------------------------------------------------- MobileNetV2-style

def _relu6(g, x, name):
    """ReLU6 as MobileNetV2's ONNX exports write it: Clip(x, 0, 6) with min/max inputs."""
    lo = g._const(f"{name}_min", np.array(0.0))
    hi = g._const(f"{name}_max", np.array(6.0))
    g.nodes.append(helper.make_node("Clip", [x, lo, hi], [name], name=name))
    g.channels[name] = g.channels[x]
    return name


def _bn_mobile(g, x, name):
    """BatchNorm with ImageNet-like statistics: running means and variances far from 0 and 1,
    so folding it into the conv changes the weights and bias substantially."""
    c = g.channels[x]
    ins = [x] + [g._const(f"{name}_{t}", v) for t, v in [
        ("s", g.rng.uniform(0.2, 2.0, c)), ("b", g.rng.standard_normal(c) * 0.5),
        ("m", g.rng.standard_normal(c) * 0.5), ("v", g.rng.uniform(0.1, 3.0, c))]]
    g.nodes.append(helper.make_node("BatchNormalization", ins, [name], name=name,
                                    epsilon=1e-5))
    g.channels[name] = c
    return name


def _conv_bn(g, x, name, out, k=1, s=1, group=1, relu6=True):
    """conv (no bias, as in MobileNetV2) + BatchNorm (+ ReLU6)."""
    y = _bn_mobile(g, g.conv(x, name, out, k=k, s=s, group=group, bias=False), f"{name}/bn")
    return _relu6(g, y, f"{name}/relu6") if relu6 else y


def _inverted_residual(g, x, name, out, expand, stride):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6 (skipped when expand == 1), 3x3 depthwise
    + BN + ReLU6, 1x1 project + BN, and a residual Add when the shape is kept."""
    cin = g.channels[x]
    hidden = cin * expand
    y = _conv_bn(g, x, f"{name}/expand", hidden, k=1) if expand != 1 else x
    y = _conv_bn(g, y, f"{name}/dwise", hidden, k=3, s=stride, group=hidden)
    y = _conv_bn(g, y, f"{name}/project", out, k=1, relu6=False)
    if stride == 1 and cin == out:
        y = g.add(x, y, f"{name}/add")
    return y


# (expand ratio, output channels, repeats, first stride): MobileNetV2's first stages, 1280
# head and 1000 classes kept, the deep stages cut short so a test builds it in seconds
MOBILENET_V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 2)]
# the real network's table (torchvision / the ONNX model zoo)
MOBILENET_V2_FULL = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2_model(path, shape=(1, 3, 224, 224), classes=1000, head=1280, seed=0,
                       stages=None):
    """A MobileNetV2-style network: stem conv 3x3/s2 + BN + ReLU6, inverted residual blocks
    (1x1 expand, 3x3 depthwise, 1x1 project, each with BN; residual Add at stride 1 and
    equal width; the 16->96 expand runs at 1/2 input resolution), a 1x1 head conv + BN +
    ReLU6, global average pool, Flatten and a Gemm classifier (logits, no Softmax).
    He-init weights and random BatchNorm statistics, deterministic in ``seed``."""
    g = GraphMaker(shape, seed=seed)
    x = _conv_bn(g, "data", "stem", 32, k=3, s=2)
    for stage, (expand, out, repeats, stride) in enumerate(stages or MOBILENET_V2_STAGES):
        for i in range(repeats):
            x = _inverted_residual(g, x, f"block{stage}_{i}", out, expand,
                                   stride if i == 0 else 1)
    x = _conv_bn(g, x, "head", head, k=1)
    x = g._unary("GlobalAveragePool", x, "pool")
    x = g._unary("Flatten", x, "flatten", axis=1)
    w = g._const("fc_w", g.rng.standard_normal((classes, head)) * np.sqrt(1.0 / head))
    b = g._const("fc_b", g.rng.standard_normal(classes) * 0.1)
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"], name="fc", transB=1))
    return g.save(path, ["logits"])


# --------------------------------------------------------------------------- importer shapes

def prelu_model(path, shape=(1, 3, 32, 32), leaky=False):
    """conv1 -> PRelu (per-channel slopes; LeakyRelu when ``leaky``) -> pool1 3x3/s2 ->
    conv2 -> PRelu -> pool2 2x2/s2 -> tail: the chains of a face-detection CNN."""
    g = GraphMaker(shape)
    x = "data"
    for i, (out, pool) in enumerate([(8, "max"), (12, "ave")], start=1):
        x = g.conv(x, f"conv{i}", out, k=3)
        if leaky:
            x = g._unary("LeakyRelu", x, f"act{i}", alpha=0.1)
        else:
            slope = g._const(f"act{i}_slope", g.rng.uniform(0.05, 0.3, (out, 1, 1)))
            g.nodes.append(helper.make_node("PRelu", [x, slope], [f"act{i}"], name=f"act{i}"))
            g.channels[f"act{i}"] = out
            x = f"act{i}"
        x = g.maxpool(x, f"pool{i}", k=3, s=2) if pool == "max" else \
            g.avgpool(x, f"pool{i}", k=2, s=2)
    return g.save(path, [g.conv(x, "tail", 4, k=1)])


def _pad(g, x, name, pads, value):
    """An explicit ONNX Pad (opset 13: pads and value as inputs) of H and W by ``pads``
    ([top, left, bottom, right])."""
    t, l, b, r = pads
    p = g._const(f"{name}_pads", np.array([0, 0, t, l, 0, 0, b, r]))
    g.inits[-1] = numpy_helper.from_array(np.array([0, 0, t, l, 0, 0, b, r], np.int64),
                                          f"{name}_pads")
    v = g._const(f"{name}_value", np.array(value))
    g.nodes.append(helper.make_node("Pad", [x, p, v], [name], name=name, mode="constant"))
    g.channels[name] = g.channels[x]
    return name


def pad_model(path, shape=(1, 3, 32, 32)):
    """Explicit Pad nodes as PyTorch/TF exports write them: zero Pad -> conv1 (no padding of
    its own) -> relu -> -inf Pad (bottom/right only) -> pool1 3x3/s2 -> conv2 -> relu ->
    pool2 -> tail."""
    g = GraphMaker(shape)
    x = _pad(g, "data", "conv1/pad", (1, 1, 1, 1), 0.0)
    x = g.relu(g.conv(x, "conv1", 8, k=3, p=0), "relu1")
    x = _pad(g, x, "pool1/pad", (0, 0, 1, 1), -np.inf)
    x = g.maxpool(x, "pool1", k=3, s=2)
    x = g.relu(g.conv(x, "conv2", 12, k=3), "relu2")
    x = g.maxpool(x, "pool2", k=2, s=2)
    return g.save(path, [g.conv(x, "tail", 4, k=1)])


def if_model(path, shape=(1, 3, 32, 32)):
    """conv1 -> relu -> pool1 (a site), then an ONNX If on a constant condition whose
    branches read pool1 (then: Relu, else: Neg), then the tail conv."""
    g = GraphMaker(shape)
    x = g.maxpool(g.relu(g.conv("data", "conv1", 8, k=3), "relu1"), "pool1", k=3, s=2)
    cond = g._const("cond", np.array(True))
    g.inits[-1] = numpy_helper.from_array(np.array(True), "cond")
    branches = []
    for label, op in (("then", "Relu"), ("else", "Neg")):
        out = helper.make_tensor_value_info(f"{label}_out", TensorProto.FLOAT, None)
        branches.append(helper.make_graph(
            [helper.make_node(op, [x], [f"{label}_out"], name=f"{label}_op")],
            f"{label}_branch", [], [out]))
    g.nodes.append(helper.make_node("If", [cond], ["gate"], name="gate",
                                    then_branch=branches[0], else_branch=branches[1]))
    g.channels["gate"] = g.channels[x]
    return g.save(path, [g.conv("gate", "tail", 4, k=1)])


def clip_model(path, shape=(1, 3, 32, 32)):
    """conv1 -> ReLU6 (ONNX Clip with min/max inputs, as MobileNet exports write it) ->
    pool1 3x3/s2 -> tail."""
    g = GraphMaker(shape)
    x = g.maxpool(_relu6(g, g.conv("data", "conv1", 8, k=3), "relu6_1"), "pool1", k=3, s=2)
    return g.save(path, [g.conv(x, "tail", 4, k=1)])


def constant_pads_model(path, shape=(1, 3, 16, 16)):
    """A Pad whose pads are computed by a constant subgraph (Constant -> Cast -> Concat), as
    exporters write them; TVM's importer cannot take it unfolded."""
    g = GraphMaker(shape)
    for name, value, dtype in (("pads_begin", [0, 0, 1, 1], np.int64),
                               ("pads_end", [0, 0, 1, 1], np.int32)):
        g.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array(value, dtype))))
    g.nodes.append(helper.make_node("Cast", ["pads_end"], ["pads_end64"], to=TensorProto.INT64))
    g.nodes.append(helper.make_node("Concat", ["pads_begin", "pads_end64"], ["pads"], axis=0))
    g.nodes.append(helper.make_node("Pad", ["data", "pads"], ["padded"], name="conv1/pad",
                                    mode="constant"))
    g.channels["padded"] = g.channels["data"]
    x = g.maxpool(g.relu(g.conv("padded", "conv1", 8, k=3, p=0), "relu1"), "pool1", k=3, s=2)
    return g.save(path, [g.conv(x, "tail", 4, k=1)])


# --------------------------------------------------------------------------- input variants

def _save_with_inputs(g, path, outputs, inputs):
    """Save ``g``'s model with ``inputs`` (ValueInfoProtos, in order) as its graph inputs."""
    model = g.model(outputs)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))
    return str(path)


def two_input_model(path, image_first=True, shape=(1, 3, 16, 16), extra_shape=(1, 8, 1, 1)):
    """Two float inputs: ``image`` (NCHW) -> conv1 -> relu -> pool1 -> + ``offset``
    (``extra_shape``, broadcast) -> tail; ``image_first=False`` lists ``offset`` first."""
    g = GraphMaker(shape)
    g.channels["image"] = shape[1]
    x = g.maxpool(g.relu(g.conv("image", "conv1", 8, k=3), "relu1"), "pool1", k=3, s=2)
    x = g.add(x, "offset", "add_offset")
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))
    offset = helper.make_tensor_value_info("offset", TensorProto.FLOAT, list(extra_shape))
    inputs = [image, offset] if image_first else [offset, image]
    return _save_with_inputs(g, path, [g.conv(x, "tail", 4, k=1)], inputs)


def typed_input_model(path, elem_type, shape=(1, 3, 16, 16)):
    """An input of ONNX type ``elem_type`` (TensorProto.UINT8, FLOAT16, ...), Cast to float,
    then conv1 -> relu -> pool1 -> tail."""
    g = GraphMaker(shape)
    g.nodes.append(helper.make_node("Cast", ["data"], ["data_f"], name="to_float",
                                    to=TensorProto.FLOAT))
    g.channels["data_f"] = shape[1]
    x = g.maxpool(g.relu(g.conv("data_f", "conv1", 8, k=3), "relu1"), "pool1", k=3, s=2)
    inputs = [helper.make_tensor_value_info("data", elem_type, list(shape))]
    return _save_with_inputs(g, path, [g.conv(x, "tail", 4, k=1)], inputs)


def dynamic_input_model(path, dims=("N", 3, "H", "W")):
    """Fully convolutional conv1 -> relu -> pool1 -> tail whose input dims are ``dims``
    (ints are fixed, strings symbolic dim_params, as exporters write dynamic axes)."""
    g = GraphMaker((1, dims[1], 16, 16))
    x = g.maxpool(g.relu(g.conv("data", "conv1", 8, k=3), "relu1"), "pool1", k=3, s=2)
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, list(dims))]
    return _save_with_inputs(g, path, [g.conv(x, "tail", 4, k=1)], inputs)


def no_conv_model(path, shape=(1, 3, 16, 16)):
    """No conv2d at all: relu -> max pool -> global average pool -> flatten."""
    g = GraphMaker(shape)
    x = g.maxpool(g.relu("data", "relu1"), "pool1", k=3, s=2)
    x = g._unary("Flatten", g._unary("GlobalAveragePool", x, "gap"), "flatten", axis=1)
    return g.save(path, [x])


def one_conv_model(path, shape=(1, 3, 16, 16)):
    """A single conv: nothing to slim (its rebirth is the original)."""
    g = GraphMaker(shape)
    return g.save(path, [g.conv("data", "conv1", 8, k=3)])
