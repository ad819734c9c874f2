"""RebirthPlan: the user-editable YAML record of where and how a model will be slimmed."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path

import yaml

from .errors import RebirthError
from .passes.analysis import analyze_sites, block_difference
from .report.output import write_atomic
from .passes.site import (KERNEL_POLICIES, SITE_KINDS, RebirthSite, branch_conv_layout,
                          branch_groups)

PLAN_FORMAT = "rebirth-plan/1"


@dataclasses.dataclass
class RebirthPlan:
    model_name: str
    model_sha256: str
    input_shapes: dict
    policy: str
    kinds: list
    sites: list  # RebirthSite
    rejected: list = dataclasses.field(default_factory=list)  # [{"id", "reason"}]
    source: str = ""
    path: str = ""  # the file it was loaded from, for messages
    # how the enabled variants were chosen (planning.selection.Selection.to_dict): target,
    # unit, budget, predicted costs, per site the variant, reason and every variant's costs;
    # empty for a plan that enables every site found
    selection: dict = dataclasses.field(default_factory=dict)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, policy="keep-kernel", kinds=SITE_KINDS,
                   branch_widths="carry") -> "RebirthPlan":
        try:
            analysis = analyze_sites(model.mod, policy, kinds, branch_widths=branch_widths)
        except ValueError as err:  # a bad policy, kind or width setting
            raise RebirthError(str(err)) from None
        return cls(model_name=model.name, model_sha256=model.sha256,
                   input_shapes={k: list(v) for k, v in model.input_shapes.items()},
                   policy=policy, kinds=list(kinds), sites=analysis.sites,
                   rejected=[{"id": r.id, "reason": r.reason} for r in analysis.rejected],
                   source=str(model.path))

    @classmethod
    def from_module(cls, mod, name=None, **options) -> "RebirthPlan":
        """``from_model`` for any Relax IRModule with bound weights (options as there)."""
        from .frontend.loader import as_model

        return cls.from_model(as_model(mod, name), **options)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "model": {"name": self.model_name, "sha256": self.model_sha256,
                      "source": self.source},
            "input_shapes": self.input_shapes,
            "policy": self.policy,
            "kinds": list(self.kinds),
            "sites": [s.to_dict() for s in self.sites],
            "rejected": list(self.rejected),
            **({"selection": self.selection} if self.selection else {}),
        }

    @property
    def sha256(self) -> str:
        """Hash of the plan's content (not its formatting): weights files record it."""
        content = self.to_dict()
        content["model"] = {k: v for k, v in content["model"].items() if k != "source"}
        content.pop("selection", None)  # how the sites were chosen: not what weights fit
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_enabled(self, keep) -> "RebirthPlan":
        """A copy whose sites are enabled where ``keep(site)`` is true (the others off)."""
        return dataclasses.replace(self, sites=[dataclasses.replace(s, enabled=bool(keep(s)))
                                                for s in self.sites])

    def enabled_sites(self, kind=None) -> list:
        return [s for s in self.sites if s.enabled and (kind is None or s.kind == kind)]

    def site(self, site_id: str) -> RebirthSite:
        for s in self.sites:
            if s.id == site_id:
                return s
        raise KeyError(site_id)

    def save(self, path) -> None:
        path = Path(path)
        header = ("# tvm-rebirth plan: edit `enabled` or a site's `new_conv` (kernel, stride,\n"
                  "# padding, out_channels); `tvm-rebirth` validates edits against the model.\n")
        text = header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None,
                                       width=100)
        write_atomic(path, text)

    @classmethod
    def load(cls, path) -> "RebirthPlan":
        path = Path(path)
        if not path.exists():
            raise RebirthError(f"{path}: no such plan file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RebirthError(f"{path}: not valid YAML{where}") from None
        except UnicodeDecodeError:
            raise RebirthError(f"{path}: not a text file") from None
        plan = cls.from_dict(data, str(path))
        plan.path = str(path)
        return plan

    @classmethod
    def from_dict(cls, data, label="plan") -> "RebirthPlan":
        """The plan a parsed YAML document describes; RebirthError naming the key (and site)
        of an unknown key or a value of the wrong shape."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise RebirthError(f"{label}: not a tvm-rebirth plan (expected format: {PLAN_FORMAT})")
        _refuse_unknown_keys(data, PLAN_KEYS, label)
        model = data.get("model")
        if not isinstance(model, dict):
            raise RebirthError(f"{label}: 'model' must be a mapping with name and sha256, "
                               f"got {_shape(model)}")
        _refuse_unknown_keys(model, MODEL_KEYS, f"{label}: model")
        for key in ("name", "sha256"):
            if not isinstance(model.get(key), str):
                raise RebirthError(f"{label}: model.{key} must be a string, got "
                                   f"{_shape(model.get(key))}")
        policy = data.get("policy", "keep-kernel")
        if policy not in KERNEL_POLICIES:
            raise RebirthError(f"{label}: unknown policy '{policy}'")
        raw_sites = _list_of(data, "sites", label)
        input_shapes = data.get("input_shapes") or {}
        if not isinstance(input_shapes, dict):
            raise RebirthError(f"{label}: 'input_shapes' must be a mapping of input name to "
                               f"shape, got {_shape(input_shapes)}")
        kinds = _list_of(data, "kinds", label) or list(SITE_KINDS)
        rejected = _list_of(data, "rejected", label)
        sites = [_site_from_dict(raw, i, label) for i, raw in enumerate(raw_sites)]
        selection = data.get("selection") or {}
        if not isinstance(selection, dict):
            raise RebirthError(f"{label}: 'selection' must be a mapping, got "
                               f"{_shape(selection)}")
        return cls(model_name=model["name"], model_sha256=model["sha256"],
                   input_shapes=dict(input_shapes), policy=policy, kinds=kinds, sites=sites,
                   rejected=rejected, source=str(model.get("source", "")),
                   selection=selection)

    # -- validation ----------------------------------------------------------------------
    def validate(self, model, label=None) -> None:
        """Check the plan against ``model``; raise RebirthError naming the first bad site."""
        label = label or self.path or "plan"
        if self.model_sha256 != model.sha256:
            raise RebirthError(
                f"{label}: made for model '{self.model_name}' (sha256 {self.model_sha256[:12]}), "
                f"not for {model.path} (sha256 {model.sha256[:12]})")
        shapes = {k: list(v) for k, v in model.input_shapes.items()}
        if {k: list(v) for k, v in self.input_shapes.items()} != shapes:
            raise RebirthError(f"{label}: input shapes {self.input_shapes} differ from the "
                               f"model's {shapes}")
        analysis = analyze_sites(model.mod, self.policy, SITE_KINDS)
        seen = set()
        for site in self.sites:
            if site.id in seen:
                raise RebirthError(f"{label}: site '{site.id}' appears twice")
            seen.add(site.id)
            ref = analysis.site(site.id)
            if ref is None:
                raise RebirthError(f"{label}: site '{site.id}' does not exist in {model.name}")
            difference = block_difference(site, ref)
            if difference:
                raise RebirthError(f"{label}: site '{site.id}': {difference}")
            try:
                if site.kind == "branch":
                    # the module's facts about its branches replace what the file says
                    site.branches = list(ref.branches)
                    _validate_branch(site, ref, {
                        name: analysis.conv_spec(block)
                        for name, block in analysis.trace(site.id).convs.items()})
                else:
                    _validate_site(site, ref)
            except ValueError as err:  # an edit the block cannot take
                raise RebirthError(f"{label}: site '{site.id}': {err}") from None


# the keys a plan file may hold (RebirthPlan.to_dict and RebirthSite.to_dict write them)
PLAN_KEYS = ("format", "model", "input_shapes", "policy", "kinds", "sites", "rejected",
             "selection")
MODEL_KEYS = ("name", "sha256", "source")
SITE_KEYS = ("id", "kind", "enabled", "exact", "ops", "layers", "input_hw", "output_hw",
             "old_conv", "new_conv", "branches", "absorb", "note")
SITE_LIST_KEYS = ("ops", "layers", "input_hw", "output_hw", "old_conv", "new_conv", "branches")


def _shape(value) -> str:
    """What a YAML value is, for messages: 'a string', 'null', ..."""
    if value is None:
        return "null"
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number",
             list: "a list", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


def _refuse_unknown_keys(data: dict, allowed, where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else \
            f" (known keys: {', '.join(allowed)})"
        raise RebirthError(f"{where}: unknown key '{key}'{hint}")


def _list_of(data: dict, key: str, where: str) -> list:
    """``data[key]`` as a list: absent or null is empty, anything else but a list an error."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RebirthError(f"{where}: '{key}' must be a list, got {_shape(value)}")
    return value


def _site_from_dict(raw, index: int, label: str) -> RebirthSite:
    """One site of a plan file, its keys and their shapes checked (RebirthSite.from_dict
    checks the conv fields)."""
    if not isinstance(raw, dict):
        raise RebirthError(f"{label}: site #{index} must be a mapping of site keys, got "
                           f"{_shape(raw)}")
    where = f"{label}: site '{raw.get('id', f'#{index}')}'"
    _refuse_unknown_keys(raw, SITE_KEYS, where)
    for key in ("id", "kind", "ops", "old_conv", "new_conv", "exact"):
        if key not in raw:
            raise RebirthError(f"{where}: missing key '{key}'")
    for key in SITE_LIST_KEYS:
        if key in raw and not isinstance(raw[key], list):
            raise RebirthError(f"{where}: '{key}' must be a list, got {_shape(raw[key])}")
    for key in ("old_conv", "new_conv"):
        bad = next((c for c in raw[key] if not isinstance(c, dict)), "ok")
        if bad != "ok":
            raise RebirthError(f"{where}: every entry of '{key}' must be a mapping of conv "
                               f"fields, got {_shape(bad)}")
    for key in ("enabled", "exact"):
        if key in raw and not isinstance(raw[key], bool):
            raise RebirthError(f"{where}: {key} must be true or false, got {raw[key]!r}")
    if raw.get("absorb") is not None and not isinstance(raw["absorb"], dict):
        raise RebirthError(f"{where}: 'absorb' must be a mapping, got {_shape(raw['absorb'])}")
    try:
        return RebirthSite.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise RebirthError(f"{where}: {detail}") from None


def _validate_site(site: RebirthSite, ref: RebirthSite) -> None:
    """Edits of a streamline site (its block is the module's: see block_difference)."""
    if [list(site.input_hw), list(site.output_hw)] != [list(ref.input_hw), list(ref.output_hw)]:
        raise ValueError("input_hw/output_hw differ from the model's")
    if len(site.new_conv) != len(site.old_conv) or (
            site.kind == "streamline" and len(site.new_conv) != len(ref.new_conv)):
        raise ValueError(f"needs {len(ref.new_conv)} new_conv entries, has {len(site.new_conv)}")
    for new, old, proposed in zip(site.new_conv, site.old_conv, ref.new_conv):
        if new.replaces != old.replaces:
            raise ValueError(f"new_conv replaces '{new.replaces}', expected '{old.replaces}'")
        where = f"new_conv '{new.replaces}'"
        if new.in_channels != old.in_channels or new.groups != old.groups:
            raise ValueError(f"{where}: in_channels/groups must stay "
                             f"{old.in_channels}/{old.groups}")
        if site.kind == "streamline":
            if new.out_channels != old.out_channels:
                raise ValueError(f"{where}: out_channels must stay {old.out_channels}")
            if new.stride != proposed.stride:
                raise ValueError(f"{where}: stride must be {proposed.stride} (the product of "
                                 "the conv and pool strides)")
            in_hw = site.input_hw
            got = new.output_hw(in_hw)
            if got != list(site.output_hw):
                raise ValueError(f"{where}: {new.describe()} on {in_hw[0]}x{in_hw[1]} gives "
                                 f"{got[0]}x{got[1]}, the block gives "
                                 f"{site.output_hw[0]}x{site.output_hw[1]}; adjust padding")
    if site.exact and [c.to_dict() for c in site.new_conv] != [c.to_dict() for c in ref.new_conv]:
        raise ValueError("an exact site's new_conv is computed in closed form and cannot be "
                         "edited; set exact: false to learn it instead")
    if site.exact and not ref.exact:
        raise ValueError("exact: true, but the block has a nonlinearity inside")


def _validate_branch(site: RebirthSite, ref: RebirthSite, module_convs: dict) -> None:
    """A branch site: the user may edit ``absorb`` (which branch takes which) and the
    reducers' widths; everything else follows from those and the module (its block is the
    module's: see block_difference)."""
    if site.exact:
        raise ValueError("a branch merge is learned: exact must be false")
    groups = branch_groups(site)
    pool_index = next(i for i, b in enumerate(ref.branches) if b.pool)
    pool_conv = ref.branches[pool_index].last_conv
    if (site.absorb.pool_branch if site.absorb else None) != pool_conv:
        raise ValueError(f"absorb.pool_branch must be '{pool_conv}', the pool branch's conv")
    for receiver, covered in groups.items():
        b = ref.branches[receiver]
        if b.pool or "batch_norm" in b.ops or len(b.convs) > 2 or (
                len(b.convs) == 2 and b.kernels[0] != [1, 1]):
            raise ValueError(f"'{b.last_conv}' cannot absorb other branches (a receiver is "
                             "a conv, or a 1x1 reducer -> conv, without pools or BN)")
        if pool_index in covered:
            window, kernel = ref.branches[pool_index].pool_window, b.kernels[-1]
            if kernel[0] < window[0] or kernel[1] < window[1]:
                raise ValueError(f"absorbing conv '{b.last_conv}' has kernel {kernel}, "
                                 f"smaller than the {window[0]}x{window[1]} pool window it "
                                 "must cover")
    layout = branch_conv_layout(site, groups)
    names = [name for name, _, _ in layout]
    if [c.replaces for c in site.new_conv] != names or \
            [c.replaces for c in site.old_conv] != names:
        raise ValueError(f"old_conv/new_conv must list {names} (the receivers' reducer and "
                         "last conv, in branch order) for this absorb")
    reducer_out = {}
    for (name, role, receiver), old, new in zip(layout, site.old_conv, site.new_conv):
        where = f"new_conv '{name}'"
        if old.to_dict() != module_convs[name].to_dict():
            raise ValueError(f"old_conv '{name}' differs from the model's convolution")
        if (new.kernel, new.stride, new.padding, new.groups) != (
                old.kernel, old.stride, old.padding, old.groups):
            raise ValueError(f"{where}: branch slimming keeps kernel, stride, padding and "
                             f"groups ({old.describe()}); only widths change")
        if role == "reducer":
            if new.in_channels != old.in_channels:
                raise ValueError(f"{where}: in_channels must stay {old.in_channels}")
            reducer_out[receiver] = new.out_channels
            continue
        want_in = reducer_out.get(receiver, old.in_channels)
        want_out = sum(ref.branches[i].out_channels for i in groups[receiver])
        if new.in_channels != want_in:
            raise ValueError(f"{where}: in_channels must be {want_in} (its input's width)")
        if new.out_channels != want_out:
            parts = "+".join(str(ref.branches[i].out_channels) for i in groups[receiver])
            raise ValueError(f"{where}: out_channels must be {parts}={want_out}, the widths "
                             "of the branches it computes (the module keeps its width)")
