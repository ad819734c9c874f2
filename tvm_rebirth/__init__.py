"""tvm-rebirth: DeepRebirth layer slimming as an Apache TVM (Relax) compiler plugin."""

from .errors import RebirthError
from .model import LoadedModel, load_model
from .plan import RebirthPlan

__all__ = ["RebirthError", "LoadedModel", "load_model", "RebirthPlan"]
__version__ = "0.1.0"
