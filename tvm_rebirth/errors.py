"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

import tvm_ffi


@tvm_ffi.register_error  # keeps its type when raised inside a pass run through TVM's FFI
class RebirthError(Exception):
    """A user-facing error: bad model file, bad plan, bad weights, unreachable device.

    The message must name the file, site, key or host it is about, on one line.
    """
