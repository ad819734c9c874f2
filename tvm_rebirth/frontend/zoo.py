"""The built-in model zoo.

The ``onnx`` wheel ships the real architectures of classic CNNs under
``onnx/backend/test/data/light/`` with every weight replaced by a ``ConstantOfShape`` node.
We materialise each once into the user cache with deterministic weights: He-normal
convolutions and dense layers, BatchNorm statistics taken from a real forward pass (so every
normalised activation has zero mean and unit variance), and readable layer names (BVLC
names where the original prototxt is known) so plan site ids say which layers they slim.
"""

from __future__ import annotations

import logging
import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..errors import RebirthError

logger = logging.getLogger(__name__)

MATERIALISE_SEED = 20170815  # the DeepRebirth arXiv date; changing it changes every sha256


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # file name inside onnx/backend/test/data/light
    description: str
    input_shape: tuple
    # preprocessing applied to calibration/eval images: RGB mean and std in 0..255 units
    mean: tuple = (123.68, 116.78, 103.94)
    std: tuple = (1.0, 1.0, 1.0)
    # node index -> layer name, for layers the light export left unnamed (n0, n1, ...)
    layer_names: dict = dataclasses.field(default_factory=dict)
    calibration: str = "imagenet-photos"  # default unlabeled images for the fine-tune stage
    labeled: str = ""  # labeled evaluation set, if the model classifies anything
    path: str = ""  # a model file shipped with the package instead of the onnx wheel
    trained_by: str = ""  # the script that trains a shipped model (``path``)


def _googlenet_names():
    names = {2: "pool1/3x3_s2", 3: "pool1/norm1", 8: "conv2/norm2", 9: "pool2/3x3_s2",
             38: "pool3/3x3_s2", 109: "pool4/3x3_s2", 138: "pool5/7x7_s1"}
    modules = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    pool_nodes = [20, 34, 49, 63, 77, 91, 105, 120, 134]
    for module, node in zip(modules, pool_nodes):
        names[node] = f"inception_{module}/pool"
        names[node + 3] = f"inception_{module}/output"  # pool, pool_proj, relu, concat
    return names


_ALEXNET_NAMES = {2: "norm1", 3: "pool1", 6: "norm2", 7: "pool2", 14: "pool5"}

ZOO = {
    m.name: m
    for m in [
        ZooModel("googlenet", "light_inception_v1.onnx", "BVLC GoogLeNet (Inception v1)",
                 (1, 3, 224, 224), layer_names=_googlenet_names()),
        ZooModel("alexnet", "light_bvlc_alexnet.onnx", "BVLC AlexNet (grouped conv2/4/5)",
                 (1, 3, 224, 224), layer_names=_ALEXNET_NAMES),
        ZooModel("zfnet", "light_zfnet512.onnx", "ZFNet-512", (1, 3, 224, 224),
                 layer_names={2: "norm1", 3: "pool1", 6: "norm2", 7: "pool2", 14: "pool5"}),
        ZooModel("squeezenet", "light_squeezenet.onnx", "SqueezeNet 1.0", (1, 3, 224, 224)),
        ZooModel("resnet50", "light_resnet50.onnx", "ResNet-50 (Caffe2 export)",
                 (1, 3, 224, 224), std=(58.4, 57.1, 57.4)),
        ZooModel("vgg19", "light_vgg19.onnx", "VGG-19", (1, 3, 224, 224)),
        ZooModel("inception_v2", "light_inception_v2.onnx", "BN-Inception (Inception v2)",
                 (1, 3, 224, 224)),
        ZooModel("densenet121", "light_densenet121.onnx", "DenseNet-121", (1, 3, 224, 224),
                 std=(58.4, 57.1, 57.4)),
        ZooModel("shufflenet", "light_shufflenet.onnx", "ShuffleNet (g=3)", (1, 3, 224, 224),
                 std=(58.4, 57.1, 57.4)),
        ZooModel("fmnist-inception", "fmnist_inception.onnx",
                 "GoogLeNet-style net trained on Fashion-MNIST (accuracy reference)",
                 (1, 1, 28, 28), mean=(72.94,), std=(90.02,), calibration="fashion-mnist",
                 labeled="fashion-mnist-test", path="zoo_data/fmnist_inception.onnx",
                 trained_by="benchmarks/train_fmnist_inception.py"),
        ZooModel("fmnist-vgg", "fmnist_vgg.onnx",
                 "VGG-style net with PReLU and BatchNorm after it, trained on Fashion-MNIST "
                 "(second accuracy reference)",
                 (1, 1, 28, 28), mean=(72.94,), std=(90.02,), calibration="fashion-mnist",
                 labeled="fashion-mnist-test", path="zoo_data/fmnist_vgg.onnx",
                 trained_by="benchmarks/train_fmnist_vgg.py"),
    ]
}

DEFAULT_MODEL = "googlenet"


def cache_dir() -> Path:
    root = os.environ.get("TVM_REBIRTH_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm-rebirth"


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_path(name: str) -> Path:
    """Path of the materialised ONNX file of a zoo model, building it on first use."""
    if name not in ZOO:
        raise RebirthError(f"unknown model '{name}': not a file and not in the zoo "
                           f"({', '.join(ZOO)})")
    entry = ZOO[name]
    if entry.path:  # trained by us and shipped with the package
        path = Path(__file__).parent / entry.path
        if not path.exists():
            raise RebirthError(f"{path}: missing; train it with {entry.trained_by}")
        return path
    path = cache_dir() / "models" / f"{name}.onnx"
    if not path.exists():
        logger.info(f"[zoo] materialising {name} into {path} (once)")
        model = materialise(ZOO[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    return path


def _layer_prefix(weight_name: str) -> str:
    name = weight_name.split("gpu_0/")[-1]
    return re.sub(r"_(w|s|scale|b|bias|rm|riv|mean|var)_0$", "", name)


def materialise(entry: ZooModel):
    """Return the zoo model as an ONNX ModelProto with deterministic weights and names."""
    import onnx
    from onnx import numpy_helper

    src = _light_dir() / entry.source
    if not src.exists():
        raise RebirthError(f"{src}: missing from the installed onnx wheel")
    model = onnx.load(str(src))
    graph = model.graph
    rng = np.random.default_rng(MATERIALISE_SEED)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    # 1. ConstantOfShape placeholders -> real initializers.
    consumers = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    weights = {}
    kept_nodes = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept_nodes.append(node)
            continue
        out = node.output[0]
        shape = tuple(int(d) for d in inits[node.input[0]])
        weights[out] = _init_tensor(out, shape, consumers.get(out, []), rng)
    # 2. Name every remaining node: conv/bn from their weights, others from the entry's table.
    counts = {}
    for idx, node in enumerate(kept_nodes):
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            node.name = _layer_prefix(node.input[1])
        elif node.op_type == "BatchNormalization":
            node.name = _layer_prefix(node.input[1])
        elif idx in entry.layer_names:
            node.name = entry.layer_names[idx]
        else:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            node.name = f"{node.op_type.lower()}_{counts[node.op_type]}"
    del graph.node[:]
    graph.node.extend(kept_nodes)
    used = {n for node in kept_nodes for n in node.input}
    new_inits = [numpy_helper.from_array(v, k) for k, v in inits.items()
                 if not k.endswith("__SHAPE") and k in used]
    new_inits += [numpy_helper.from_array(v, k) for k, v in weights.items()]
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    init_names = {t.name for t in graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in init_names and i.name in used]
    del graph.input[:]
    graph.input.extend(data_inputs)
    model.ir_version = max(model.ir_version, 4)
    _calibrate_batchnorm(model, entry, rng)
    onnx.checker.check_model(model)
    return model


def _init_tensor(name, shape, uses, rng):
    """He-normal for conv/dense weights, identity for normalisation, zero for biases."""
    role = None
    for node, i in uses:
        if node.op_type in ("Conv", "Gemm", "MatMul") and i == 1:
            role = "weight"
        elif node.op_type in ("Conv", "Gemm") and i == 2:
            role = "bias"
        elif node.op_type == "BatchNormalization":
            role = {1: "one", 2: "zero", 3: "zero", 4: "one"}[i]
        elif node.op_type == "Reshape" and i == 0:
            role = "weight"  # GoogLeNet's classifier weight goes through a Reshape
        elif node.op_type == "Unsqueeze":
            role = "one" if re.search(r"_(w|s)_0$", name) else "zero"
    if role == "weight" and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if role == "one":
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


def _calibrate_batchnorm(model, entry, rng):
    """Set each BatchNorm's running statistics to those of its input on a real forward pass.

    Done in order, one BN at a time, so every BN sees inputs already normalised upstream.
    """
    import onnx
    from onnx import numpy_helper

    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return
    import onnxruntime as ort

    x = rng.standard_normal(entry.input_shape).astype(np.float32)
    inits = {t.name: t for t in model.graph.initializer}
    input_name = model.graph.input[0].name
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    opts.log_severity_level = 3
    logger.info(f"[zoo] {entry.name}: calibrating {len(bns)} BatchNorm layers")
    for start in range(0, len(bns)):
        bn = bns[start]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.append(onnx.helper.make_tensor_value_info(bn.input[0], 1, None))
        sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        (act,) = sess.run(None, {input_name: x})
        axes = tuple(i for i in range(act.ndim) if i != 1)
        mean = act.mean(axis=axes).astype(np.float32)
        var = act.var(axis=axes).astype(np.float32) + 1e-3
        inits[bn.input[3]].CopyFrom(numpy_helper.from_array(mean, bn.input[3]))
        inits[bn.input[4]].CopyFrom(numpy_helper.from_array(var, bn.input[4]))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
