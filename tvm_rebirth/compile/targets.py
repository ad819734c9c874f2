"""Build targets: presets by name, and anything TVM itself takes as a target.

``resolve_target`` accepts
  * a preset: ``host`` (this CPU) or a Cortex-A core (``cortex-a72``, ...), the aliases the
    CLI has always taken;
  * a ``tvm.target.Target``;
  * a TVM target tag (``arm/rk3399``, ``raspberry-pi/4b-aarch64``; ``tvm.target.list_tags()``);
  * a target dict (``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}``)
    or its JSON text, e.g. ``--target '{"kind": "llvm", "mcpu": "znver3"}'``;
  * a plain kind such as ``llvm``.
TVM 0.27 rejects flag strings (``llvm -mcpu=...``): use a dict.
"""

from __future__ import annotations

import json
import os
import re

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


def resolve_target(name):
    """A tvm Target for a preset name, a Target, a tag, a dict or its JSON (see module doc)."""
    import tvm
    from tvm.target import codegen

    if isinstance(name, tvm.target.Target):
        return name
    if isinstance(name, dict):
        return _target(name, json.dumps(name))
    name = str(name).strip()
    if name == "host":
        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                                  "num-cores": int(os.environ.get("TVM_NUM_THREADS", "2"))})
    if name in PRESETS:
        return tvm.target.Target(PRESETS[name])
    if name.startswith("{"):
        try:
            spec = json.loads(name)
        except json.JSONDecodeError as err:
            raise RebirthError(f"target '{name}': not valid JSON ({err.msg})") from None
        return _target(spec, name)
    if name in tvm.target.list_tags() or name in tvm.target.Target.list_kinds():
        return _target(name, name)
    raise RebirthError(f"unknown target '{name}': use a preset ({', '.join(preset_names())}), "
                       "a TVM tag (tvm.target.list_tags(), e.g. arm/rk3399) or a target dict "
                       "as JSON")


def _target(spec, label):
    import tvm

    try:
        return tvm.target.Target(spec)
    except Exception as err:  # TVM raises ValueError / TVMError for bad kinds and keys
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        raise RebirthError(f"target '{label}': TVM rejects it ({first})") from None


def target_label(name) -> str:
    """A file-name-safe label of a target as the user gave it (``arm/rk3399`` ->
    ``arm-rk3399``; a dict or JSON -> its mcpu/model/kind)."""
    if isinstance(name, str) and not name.strip().startswith("{"):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-") or "target"
    target = resolve_target(name)
    attrs = target.attrs
    label = str(attrs.get("mcpu", "") or attrs.get("model", "") or target.kind.name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label)


def is_cross(target) -> bool:
    return "aarch64" in str(target.attrs.get("mtriple", ""))
