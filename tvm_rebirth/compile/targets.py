"""Target presets by name (TVM 0.27 rejects flag strings: targets are dicts)."""

from __future__ import annotations

import os

from ..errors import RebirthError

_ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4}
PRESETS = {
    "cortex-a53": {**_ARM, "mcpu": "cortex-a53", "mattr": ["+neon"]},
    "cortex-a55": {**_ARM, "mcpu": "cortex-a55", "mattr": ["+neon", "+dotprod"]},
    "cortex-a72": {**_ARM, "mcpu": "cortex-a72", "mattr": ["+neon"]},
    "cortex-a76": {**_ARM, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]},
}
CROSS_COMPILER = "aarch64-linux-gnu-g++"


def preset_names() -> list:
    return ["host"] + list(PRESETS)


def resolve_target(name: str):
    """A tvm Target for a preset name: ``host`` (this CPU) or a Cortex-A core."""
    import tvm
    from tvm.target import codegen

    if name == "host":
        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                                  "num-cores": int(os.environ.get("TVM_NUM_THREADS", "2"))})
    if name not in PRESETS:
        raise RebirthError(f"unknown target '{name}': use one of {', '.join(preset_names())}")
    return tvm.target.Target(PRESETS[name])


def is_cross(target) -> bool:
    return "aarch64" in str(target.attrs.get("mtriple", ""))
