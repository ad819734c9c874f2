"""Loading a model (zoo name or .onnx path) into Relax with its parameters bound."""

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
    mod = import_onnx(onnx_model, input_shapes, str(path))
    mod = AttachLayerNames(onnx_layer_names(onnx_model))(mod)
    return LoadedModel(name=name, path=path, sha256=zoo.file_sha256(path),
                       onnx_model=onnx_model, input_shapes=input_shapes, mod=mod,
                       zoo_entry=entry)


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
