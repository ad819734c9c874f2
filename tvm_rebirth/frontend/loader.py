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

    @property
    def input_name(self) -> str:
        return next(iter(self.input_shapes))


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


def load_model(model: str) -> LoadedModel:
    """Load a zoo model or an ONNX file and import it into Relax (params bound)."""
    import onnx

    name, path, entry = resolve_model_path(model)
    try:
        onnx_model = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise RebirthError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not onnx_model.graph.node:
        raise RebirthError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    init_names = {t.name for t in onnx_model.graph.initializer}
    input_shapes = {}
    for value in onnx_model.graph.input:
        if value.name in init_names:
            continue
        dims = value.type.tensor_type.shape.dim
        input_shapes[value.name] = [d.dim_value if d.dim_value > 0 else 1 for d in dims]
    if not input_shapes:
        raise RebirthError(f"{path}: the model has no data input")
    folded = fold_constant_subgraphs(onnx_model)
    mod = import_onnx(folded, input_shapes, str(path))
    mod = AttachLayerNames(onnx_layer_names(folded))(mod)
    return LoadedModel(name=name, path=path, sha256=zoo.file_sha256(path),
                       onnx_model=onnx_model, input_shapes=input_shapes, mod=mod,
                       zoo_entry=entry)


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
