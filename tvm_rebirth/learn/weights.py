"""Rebirth weights files (.npz): ``<site id>/weight`` (OIHW), ``<site id>/bias`` and
``__meta__`` (JSON: plan sha256, calibration description, per-site relative error)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import RebirthError
from ..passes.site import weight_keys


@dataclasses.dataclass
class RebirthWeights:
    arrays: dict
    plan_sha256: str
    meta: dict = dataclasses.field(default_factory=dict)

    def save(self, path) -> None:
        path = Path(path)
        meta = dict(self.meta, plan_sha256=self.plan_sha256)
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(json.dumps(meta)),
                 **{k: np.asarray(v, np.float32) for k, v in self.arrays.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, plan=None) -> "RebirthWeights":
        """Load and, given the plan, check its hash and every site's shapes."""
        path = Path(path)
        if not path.exists():
            raise RebirthError(f"{path}: no such weights file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise RebirthError(f"{path}: not a weights .npz file ({err})") from None
        if "__meta__" not in arrays:
            raise RebirthError(f"{path}: no __meta__ entry; not written by tvm-rebirth finetune")
        meta = json.loads(str(arrays.pop("__meta__")))
        weights = cls(arrays=arrays, plan_sha256=meta.get("plan_sha256", ""), meta=meta)
        if plan is not None:
            weights.check(plan, str(path))
        return weights

    def check(self, plan, label="weights") -> None:
        if self.plan_sha256 != plan.sha256:
            where = f" ({plan.path})" if getattr(plan, "path", "") else ""
            raise RebirthError(f"{label}: learned for plan {self.plan_sha256[:12]}, not for this "
                               f"plan{where} ({plan.sha256[:12]}); re-run `tvm-rebirth finetune`")
        for site in plan.sites:
            if not site.enabled:
                continue
            for spec, (_, wkey, bkey) in zip(site.new_conv, weight_keys(site)):
                if wkey not in self.arrays and site.exact:
                    continue  # exact sites may be computed in closed form at build time
                want = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)
                for key, shape in [(wkey, want), (bkey, (spec.out_channels,))]:
                    if key not in self.arrays:
                        raise RebirthError(f"{label}: site '{site.id}': missing '{key}'")
                    got = tuple(self.arrays[key].shape)
                    if site.kind == "branch" and key == wkey:
                        # a branch conv keeps the kernel it has when BranchSlimming runs
                        # (a folded pool may have grown it): only the widths are the plan's
                        got, shape = got[:2], shape[:2]
                    if got != tuple(shape):
                        raise RebirthError(
                            f"{label}: site '{site.id}': '{key}' has shape "
                            f"{list(self.arrays[key].shape)}, the plan needs {list(shape)}")
