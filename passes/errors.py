"""The error type of the passes: a plan, weights or module that do not fit together."""

import tvm_ffi


@tvm_ffi.register_error  # keeps its type when raised inside a pass run through TVM's FFI
class RebirthError(Exception):
    """A user-facing error: the message names the site, key or layer it is about, on one line.

    The passes raise it for a plan that does not match the module, or weights that do not
    match the plan; the tvm-rebirth tool re-exports it and raises it for bad files, models
    and devices too.
    """
