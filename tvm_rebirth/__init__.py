"""tvm-rebirth: DeepRebirth layer slimming as an Apache TVM (Relax) compiler plugin."""

from .errors import RebirthError
from .model import LoadedModel, load_model
from .plan import RebirthPlan


def finetune(model, plan, images=None, calibration="", **kwargs):
    """Learn the plan's rebirth convs from calibration images (see tvm_rebirth.finetune)."""
    from .finetune import finetune as learn

    return learn(model, plan, images, calibration, **kwargs)


__all__ = ["RebirthError", "LoadedModel", "load_model", "RebirthPlan", "finetune"]
__version__ = "0.1.0"
