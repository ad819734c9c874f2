"""What a ``tvm-rebirth`` process does before TVM loads.

tvm_ffi imports torch whenever it is installed, which costs every command 1.5-2 s of CPU
before it starts. No command uses torch (training runs on TVM's own gradients), so a
``tvm-rebirth`` process hides it: an import of torch fails there as if it were not
installed. Python programs that import tvm_rebirth, and any process that has already
imported torch, are left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path


def is_cli_process(argv: list, orig_argv: list) -> bool:
    """The process is the ``tvm-rebirth`` console script or ``python -m tvm_rebirth.cli``."""
    return Path(argv[0]).name == "tvm-rebirth" or orig_argv[1:3] == ["-m", "tvm_rebirth.cli"]


def hide_torch_from_the_cli() -> None:
    argv, orig_argv = sys.argv, getattr(sys, "orig_argv", sys.argv)
    if "torch" not in sys.modules and is_cli_process(argv, orig_argv):
        sys.modules["torch"] = None  # `import torch` raises ImportError from now on
