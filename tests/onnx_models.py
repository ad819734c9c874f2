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
