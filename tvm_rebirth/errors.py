"""The one exception type the CLI turns into a one-line message and a non-zero exit.

It is the passes' own error type (``tvm_rebirth.passes.errors``), re-exported: a plan that
does not fit the module fails the same way in a pass as in the tool.
"""

from .passes.errors import RebirthError

__all__ = ["RebirthError"]
