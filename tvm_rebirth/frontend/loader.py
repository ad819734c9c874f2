"""Loading a model into Relax with its parameters bound: a zoo name or .onnx path
(``load_model``), an ONNX ModelProto through TVM's own importer (``from_onnx``), or any Relax
IRModule the user already has (``as_model``)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from pathlib import Path

from . import zoo
from ..errors import RebirthError
from ..passes.attach_layer_names import AttachLayerNames

# ONNX op type -> the Relax op (or recognised subgraph) the ONNX frontend emits for it, so the
# k-th Relax conv2d can be named after the k-th ONNX Conv node (the frontend keeps node order).
ONNX_TO_RELAX_KIND = {
    "Conv": "conv2d",
    "MaxPool": "max_pool2d",
    "AveragePool": "avg_pool2d",
    "LRN": "lrn",
    "BatchNormalization": "batch_norm",
    "Concat": "concat",
}


@dataclasses.dataclass
class LoadedModel:
    name: str
    path: Path
    sha256: str
    onnx_model: object
    input_shapes: dict
    mod: object  # tvm.IRModule with params bound as constants and layer names attached
    zoo_entry: zoo.ZooModel | None = None
    image_input: str | None = None  # the input images are fed to (None: the first input)

    @property
    def input_name(self) -> str:
        return self.image_input or next(iter(self.input_shapes))

    @property
    def other_inputs(self) -> dict:
        """{name: shape} of the inputs besides the image input."""
        return {k: v for k, v in self.input_shapes.items() if k != self.input_name}


def resolve_model_path(model: str) -> tuple[str, Path, zoo.ZooModel | None]:
    if model.endswith(".onnx") or os.sep in model or os.path.exists(model):
        path = Path(model)
        if not path.exists():
            raise RebirthError(f"{model}: no such file")
        return path.stem, path, None
    return model, zoo.zoo_path(model), zoo.ZOO[model]


def onnx_layer_names(onnx_model) -> dict:
    """{relax kind: [source layer name, ...]} in graph order; positions where unnamed."""
    names: dict = {}
    for node in onnx_model.graph.node:
        kind = ONNX_TO_RELAX_KIND.get(node.op_type)
        if kind is None:
            continue
        seq = names.setdefault(kind, [])
        seq.append(node.name or f"{kind}_{len(seq)}")
    return names


def load_model(model: str, input: str | None = None,
               input_shape: list | tuple | None = None) -> LoadedModel:
    """Load a zoo model or an ONNX file and import it into Relax (params bound). The image
    input (``image_input``, what images are fed to) is the model's only input, the one
    named ``input``, or the single float32 4-D input among several (``image_input_of``);
    ``input_shape`` fixes its dims (dynamic ones must be fixed; a dynamic batch is 1)."""
    import onnx

    name, path, entry = resolve_model_path(model)
    try:
        onnx_model = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise RebirthError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not onnx_model.graph.node:
        raise RebirthError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    init_names = {t.name for t in onnx_model.graph.initializer}
    inputs = {v.name: v for v in onnx_model.graph.input if v.name not in init_names}
    if not inputs:
        raise RebirthError(f"{path}: the model has no data input")
    image = image_input_of(inputs, path, input)
    input_shapes = {image: image_shape(inputs[image], path, input_shape)}
    for other, value in inputs.items():  # the image input first, the others as they come
        if other != image:
            input_shapes[other] = [d.dim_value if d.dim_value > 0 else 1
                                   for d in value.type.tensor_type.shape.dim]
    folded = fold_constant_subgraphs(onnx_model)
    mod = import_onnx(folded, input_shapes, str(path))
    mod = AttachLayerNames(onnx_layer_names(folded))(mod)
    return LoadedModel(name=name, path=path, sha256=zoo.file_sha256(path),
                       onnx_model=onnx_model, input_shapes=input_shapes, mod=mod,
                       zoo_entry=entry, image_input=image)


def _dtype(value) -> str:
    import onnx

    if not value.type.HasField("tensor_type"):
        return "a non-tensor"
    elem = value.type.tensor_type.elem_type
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, ValueError, TypeError):  # UNDEFINED, strings, ...
        return onnx.TensorProto.DataType.Name(elem).lower()


def _dims(value) -> list:
    """The declared dims of an ONNX input: ints, dim_param names, '?' when unnamed."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def describe_input(value) -> str:
    """'name (float32 [N, 3, H, W])': an ONNX input as error messages name it."""
    return f"'{value.name}' ({_dtype(value)} [{', '.join(map(str, _dims(value)))}])"


def image_input_of(inputs: dict, path, wanted: str | None = None) -> str:
    """The name of the image input among ``inputs`` ({name: ValueInfoProto}, initializers
    left out): ``wanted`` (--input), the only input, or the single float32 4-D one among
    several. Every other case is a RebirthError naming the inputs."""
    listed = ", ".join(describe_input(v) for v in inputs.values())
    if wanted is not None:
        if wanted not in inputs:
            raise RebirthError(f"{path}: --input {wanted}: the model has no input "
                               f"'{wanted}'; its inputs: {listed}")
        return wanted
    if len(inputs) == 1:
        return next(iter(inputs))
    images = [n for n, v in inputs.items() if _dtype(v) == "float32" and len(_dims(v)) == 4]
    if len(images) == 1:
        return images[0]
    raise RebirthError(f"{path}: the model has {len(inputs)} inputs ({listed}); name the "
                       "image input with --input NAME")


def image_shape(value, path, override=None) -> list:
    """The static NCHW shape of the image input ``value``: its declared dims with
    ``override`` (--input-shape) applied. It must be float32 and 4-D; a dynamic batch is 1,
    any other dynamic dim needs ``override``; an override must keep the fixed dims."""
    label = f"{path}: input {describe_input(value)}"
    dtype, dims = _dtype(value), _dims(value)
    if dtype != "float32":
        raise RebirthError(f"{label}: images are fed as float32; export the model with a "
                           f"float32 input (a {dtype} input is not supported)")
    if len(dims) != 4:
        raise RebirthError(f"{label}: the image input must be NCHW (4 dims), it has "
                           f"{len(dims)}" + ("" if len(dims) else
                                             " (no shape declared: give --input-shape N,C,H,W)"))
    if override is not None:
        override = [int(d) for d in override]
        if len(override) != 4 or min(override) < 1:
            raise RebirthError(f"{label}: --input-shape "
                               f"{','.join(map(str, override))} must be 4 positive dims N,C,H,W")
        fixed = [(i, d, o) for i, (d, o) in enumerate(zip(dims, override))
                 if isinstance(d, int) and d > 0 and d != o]
        if fixed:
            i, d, o = fixed[0]
            raise RebirthError(f"{label}: --input-shape {','.join(map(str, override))} "
                               f"changes its fixed dim {'NCHW'[i]} from {d} to {o}")
        return override
    dynamic = [i for i, d in enumerate(dims[1:], start=1) if not (isinstance(d, int) and d > 0)]
    if dynamic:
        what = " and ".join({1: "channel count", 2: "height", 3: "width"}[i] for i in dynamic)
        raise RebirthError(f"{label} has a dynamic {what}: give a fixed shape with "
                           "--input-shape N,C,H,W (e.g. 1,3,224,224)")
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]


def fold_constant_subgraphs(onnx_model, max_elements: int = 1 << 16):
    """``onnx_model`` with every node computed from constants only (initializers, Constant
    nodes, earlier folded nodes) replaced by an initializer holding its value, evaluated by
    onnx's reference evaluator: pads, shapes and scales computed by a constant subgraph (TVM's
    importer stops at those: "Dynamic pads are not supported yet"). Such nodes are no layers
    of the model (names stay aligned: ``onnx_layer_names`` reads the folded model). Ops with
    subgraphs and outputs over ``max_elements`` values are left alone. The model is returned
    as is when there is nothing to fold."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = onnx_model.graph
    const = {t.name for t in graph.initializer}
    const |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    opsets = {o.domain or "": o.version for o in onnx_model.opset_import}
    folded, values = [], {}
    for node in graph.node:
        if node.op_type == "Constant" or node.domain not in ("", "ai.onnx") or not node.input or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in node.attribute) or \
                not all(i == "" or i in const for i in node.input):
            continue
        try:
            feeds = {i: _constant_value(onnx_model, i, values) for i in node.input if i}
            outs = ReferenceEvaluator(node, opsets={"": opsets.get("", 13)}).run(None, feeds)
        except Exception:  # an op the reference evaluator lacks: leave it to TVM
            continue
        if any(getattr(o, "size", max_elements + 1) > max_elements for o in outs):
            continue
        for name, out in zip(node.output, outs):
            values[name] = out
            const.add(name)
        folded.append(node)
    if not folded:
        return onnx_model
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    names = {id(n) for n in folded}
    keep = [n for n in onnx_model.graph.node if id(n) not in names]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    model.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in
                                   values.items() if name in used)
    return model


def _constant_value(onnx_model, name, values):
    """numpy value of a constant tensor: folded, an initializer or a Constant node's."""
    from onnx import numpy_helper

    if name in values:
        return values[name]
    for t in onnx_model.graph.initializer:
        if t.name == name:
            values[name] = numpy_helper.to_array(t)
            return values[name]
    for node in onnx_model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            from onnx.reference import ReferenceEvaluator

            values[name] = ReferenceEvaluator(node).run(None, {})[0]
            return values[name]
    raise KeyError(name)


def from_onnx(onnx_model, shape_dict: dict | None = None, **kwargs):
    """TVM's ``tvm.relax.frontend.onnx.from_onnx`` with the source layer names attached
    (``AttachLayerNames``), so site ids are the ONNX node names and a plan made by the CLI
    for the same file applies to this module. ``onnx_model``: a ModelProto or a path;
    other keyword arguments go to TVM's importer. Constant subgraphs are folded first
    (``fold_constant_subgraphs``)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    onnx_model = fold_constant_subgraphs(onnx_model)
    mod = tvm_from_onnx(onnx_model, shape_dict=shape_dict, **kwargs)
    return AttachLayerNames(onnx_layer_names(onnx_model))(mod)


def module_sha256(mod) -> str:
    """A content hash of a Relax IRModule (its structure and constants): the identity a
    plan records for a model that is not a file."""
    import hashlib

    import tvm_ffi

    return hashlib.sha256(str(tvm_ffi.structural_hash(mod)).encode()).hexdigest()


def as_model(model, name: str | None = None, func_name: str = "main") -> LoadedModel:
    """``model`` as a LoadedModel: a LoadedModel is returned as is; a Relax IRModule (weights
    bound as constants, one tensor input per parameter) is wrapped, its input shapes read
    from ``mod[func_name]``'s parameters."""
    import tvm
    from tvm import relax

    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, tvm.IRModule):
        raise RebirthError(f"expected a Relax IRModule or a loaded model, got "
                           f"{type(model).__name__}")
    if func_name not in [g.name_hint for g in model.get_global_vars()]:
        raise RebirthError(f"the module has no function '{func_name}'")
    func = model[func_name]
    if not isinstance(func, relax.Function):
        raise RebirthError(f"'{func_name}' is not a Relax function")
    shapes = {}
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    params = func.params if num_input is None else func.params[:int(num_input)]
    for param in params:
        shape = getattr(param.ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
            raise RebirthError(f"input '{param.name}' has no static shape ({param.ty}); give "
                               "the importer static input shapes")
        shapes[str(param.name)] = [int(v) for v in values]
    name = name or (str(model.attrs["model_name"]) if model.attrs is not None
                    and "model_name" in model.attrs else "module")
    return LoadedModel(name=name, path=Path(f"<{name}: IRModule>"), sha256=module_sha256(model),
                       onnx_model=None, input_shapes=shapes, mod=model)


def import_onnx(onnx_model, input_shapes: dict, label: str):
    from tvm.relax.frontend.onnx import from_onnx

    captured = io.StringIO()
    try:
        # the frontend prints its own diagnostics to stdout; keep stdout for --json
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            return from_onnx(onnx_model, shape_dict=input_shapes)
    except NotImplementedError as err:
        raise RebirthError(f"{label}: the TVM ONNX importer rejects it: {_first_line(err)}") from None
    except Exception as err:
        extra = captured.getvalue().strip().splitlines()
        hint = f" ({extra[-1]})" if extra else ""
        raise RebirthError(f"{label}: import into Relax failed: {_first_line(err)}{hint}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
