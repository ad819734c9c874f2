"""Rebirth weights files (.npz): ``<site id>/weight`` (OIHW), ``<site id>/bias`` and
``__meta__`` (JSON: plan sha256, calibration description, per-site relative error).

A loaded file is a read-only mapping {key: array}: what the slimming passes take."""

from __future__ import annotations

import collections.abc
import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import RebirthError
from ..passes.site import site_conv_weights, weight_keys


@dataclasses.dataclass
class RebirthWeights(collections.abc.Mapping):
    """The learned arrays of one plan (``plan_sha256``) and the fine-tune report (``meta``)."""

    arrays: dict
    plan_sha256: str
    meta: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, key):
        return self.arrays[key]

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)

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
        """RebirthError unless these weights were learned for ``plan`` and hold every enabled
        site's arrays in the plan's shapes (exact sites may be left to the closed form)."""
        if self.plan_sha256 != plan.sha256:
            where = f" ({plan.path})" if getattr(plan, "path", "") else ""
            raise RebirthError(f"{label}: learned for plan {self.plan_sha256[:12]}, not for this "
                               f"plan{where} ({plan.sha256[:12]}); re-run `tvm-rebirth finetune`")
        for site in plan.enabled_sites():
            keys = weight_keys(site)
            if site.exact and not all(wkey in self.arrays for _, wkey, _ in keys):
                continue  # computed in closed form when the module is slimmed
            # a branch conv keeps the kernel it has when BranchSlimming runs: only its widths
            # are the plan's
            kernels = [self.arrays[wkey].shape[2:] if wkey in self.arrays else None
                       for _, wkey, _ in keys] if site.kind == "branch" else None
            try:
                site_conv_weights(site, self.arrays, kernels)
            except RebirthError as err:
                raise RebirthError(f"{label}: {err}") from None
