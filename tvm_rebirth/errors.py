"""The one exception type the CLI turns into a one-line message and a non-zero exit.

It is the passes' own error type (``tvm_rebirth.passes.errors``), re-exported: a plan that
does not fit the module fails the same way in a pass as in the tool. With it, the checks of
the Python API's numbers (the CLI's parser checks its flags alike): each names the argument.
"""

import math
import numbers

from .passes.errors import RebirthError

__all__ = ["RebirthError", "require_count", "require_number"]


def require_count(value, name: str, minimum: int = 0) -> None:
    """RebirthError unless ``value`` (argument ``name``) is an integer (not a bool) of at
    least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise RebirthError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def require_number(value, name: str, above=None, at_least=None, at_most=None) -> None:
    """RebirthError unless ``value`` (argument ``name``) is a finite real number (not a
    bool) above ``above``, at least ``at_least`` and at most ``at_most`` (None: no bound)."""
    bounds = [f"above {above:g}" if above is not None else "",
              f"at least {at_least:g}" if at_least is not None else "",
              f"at most {at_most:g}" if at_most is not None else ""]
    valid = not isinstance(value, bool) and isinstance(value, numbers.Real) \
        and math.isfinite(value) and (above is None or value > above) \
        and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    if not valid:
        wanted = " and ".join(b for b in bounds if b)
        raise RebirthError(f"{name} must be a finite number{' ' + wanted if wanted else ''}"
                           f", got {value!r}")
