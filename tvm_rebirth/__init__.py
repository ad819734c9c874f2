"""tvm-rebirth: DeepRebirth layer slimming as an Apache TVM (Relax) compiler plugin."""

from .startup import hide_torch_from_the_cli

hide_torch_from_the_cli()  # before TVM loads: a `tvm-rebirth` command starts ~1.5 s sooner

from .errors import RebirthError  # noqa: E402
from .frontend.loader import LoadedModel, as_model, from_onnx, load_model, onnx_layer_names
from .passes.attach_layer_names import AttachLayerNames
from .plan import RebirthPlan
# weights = finetune(mod, plan, images): RebirthWeights, the fit report as ``.meta``
# (learn.finetune.finetune is the tool's (weights, report) form of the same stage)
from .learn.finetune import learn_weights as finetune
from . import transform
# registers relax.get_pipeline("rebirth") (slim + build) next to passes' "rebirth_slim"
from .compile import pipeline as _pipeline  # noqa: F401

__all__ = ["RebirthError", "LoadedModel", "load_model", "as_model", "from_onnx",
           "onnx_layer_names", "AttachLayerNames", "RebirthPlan", "finetune", "transform"]
__version__ = "0.1.0"
