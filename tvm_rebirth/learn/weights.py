"""Rebirth weights files (.npz): ``<site id>/weight`` (OIHW), ``<site id>/bias`` and
``__meta__`` (JSON: plan sha256, calibration description, per-site relative error).

A loaded file is a read-only mapping {key: array}: what the slimming passes take."""

from __future__ import annotations

import collections.abc
import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import RebirthError
from ..passes.site import refit_keys, site_conv_weights, weight_keys
from ..report.output import write_atomic


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
        """Write the .npz atomically (report.output.write_atomic: all or nothing)."""
        meta = dict(self.meta, plan_sha256=self.plan_sha256)
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(json.dumps(meta)),
                 **{k: np.asarray(v, np.float32) for k, v in self.arrays.items()})
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path, plan=None) -> "RebirthWeights":
        """Load and, given the plan, check its hash and every site's shapes. Every array must
        be finite floats; RebirthError naming the file (and key) otherwise."""
        path = Path(path)
        if not path.is_file():
            raise RebirthError(f"{path}: no such weights file" if not path.exists() else
                               f"{path}: not a weights file (a directory or device)")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise RebirthError(f"{path}: not a weights .npz file (a single .npy array)")
            with data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            reason = str(err) or type(err).__name__
            if path.stat().st_size == 0:
                reason = "the file is empty"
            raise RebirthError(f"{path}: not a weights .npz file ({reason})") from None
        if "__meta__" not in arrays:
            raise RebirthError(f"{path}: no __meta__ entry; not written by tvm-rebirth finetune")
        meta = _parse_meta(arrays.pop("__meta__"), path)
        for key, array in arrays.items():
            if not np.issubdtype(array.dtype, np.floating):
                raise RebirthError(f"{path}: '{key}' holds {array.dtype} values, not floats")
            if not np.isfinite(array).all():
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                raise RebirthError(f"{path}: '{key}' holds {bad} NaN or Inf value(s)")
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
        self._check_refits(plan, label)

    def _check_refits(self, plan, label) -> None:
        """Every consumer refit the fine-tune report lists for an enabled site (meta
        ``sites[].refit[].layer``) must be here, weight and bias; so must the partner of any
        refit key that is. The slimming pass keeps a consumer's old weights when its refit is
        absent, so a lost key would otherwise pass unnoticed."""
        enabled = {s.id: s for s in plan.enabled_sites()}
        wanted = [refit_keys(enabled[entry["id"]], refit.get("layer", ""))
                  for entry in self.meta.get("sites") or []
                  if isinstance(entry, dict) and entry.get("id") in enabled
                  for refit in entry.get("refit") or [] if isinstance(refit, dict)]
        wanted += [(k, k[:-len("/weight")] + "/bias") if k.endswith("/weight") else
                   (k[:-len("/bias")] + "/weight", k) for k in self.arrays
                   if "/refit/" in k and k.endswith(("/weight", "/bias"))]
        for pair in wanted:
            for key in pair:
                if key not in self.arrays:
                    raise RebirthError(f"{label}: missing refit key '{key}'; re-run "
                                       "`tvm-rebirth finetune`")


def _parse_meta(raw, path) -> dict:
    """The ``__meta__`` entry: a JSON object with the plan's sha256 as a string."""
    try:
        meta = json.loads(str(raw)) if raw.ndim == 0 else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("plan_sha256", ""), str):
        raise RebirthError(f"{path}: __meta__ is not the JSON object tvm-rebirth finetune "
                           "writes (with plan_sha256)")
    return meta
