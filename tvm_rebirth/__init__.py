"""tvm-rebirth: DeepRebirth layer slimming as an Apache TVM (Relax) compiler plugin."""

from .errors import RebirthError
from .frontend.loader import LoadedModel, load_model
from .plan import RebirthPlan
# the function, bound after its submodule loads (a later `import tvm_rebirth.finetune`
# finds the module in sys.modules and leaves this name alone)
from .learn.finetune import finetune

__all__ = ["RebirthError", "LoadedModel", "load_model", "RebirthPlan", "finetune"]
__version__ = "0.1.0"
