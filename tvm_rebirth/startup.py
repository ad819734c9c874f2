"""What a ``tvm-rebirth`` process does before TVM loads.

tvm_ffi imports torch whenever it is installed, which costs every command 1.5-2 s of CPU
before it starts. Only labeled retraining (``finetune --e2e-labels``, ``learn/distill.py``)
uses torch, so a ``tvm-rebirth`` process without that flag hides it: an import of torch
fails there as if it were not installed. Python programs that import tvm_rebirth, and any
process that has already imported torch, are left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

LABELED_RETRAINING_FLAG = "--e2e-labels"


def is_cli_process(argv: list, orig_argv: list) -> bool:
    """The process is the ``tvm-rebirth`` console script or ``python -m tvm_rebirth.cli``."""
    return Path(argv[0]).name == "tvm-rebirth" or orig_argv[1:3] == ["-m", "tvm_rebirth.cli"]


def needs_torch(argv: list) -> bool:
    """The command line asks for labeled retraining (argparse also takes a unique prefix of
    the flag, and FLAG=VALUE)."""
    return any(len(a.split("=")[0]) > len("--e2e-") and
               LABELED_RETRAINING_FLAG.startswith(a.split("=")[0]) for a in argv[1:])


def hide_torch_from_the_cli() -> None:
    argv, orig_argv = sys.argv, getattr(sys, "orig_argv", sys.argv)
    if "torch" not in sys.modules and is_cli_process(argv, orig_argv) and \
            not needs_torch(orig_argv):
        sys.modules["torch"] = None  # `import torch` raises ImportError from now on
