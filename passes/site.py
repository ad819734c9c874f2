"""What a rebirth site is: the data FindRebirthSites produces and the slimming passes consume.

Pure data and geometry (no TVM objects), so a plan can be written, edited and re-validated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import RebirthError

KERNEL_POLICIES = ("keep-kernel", "keep-receptive-field")
SITE_KINDS = ("streamline", "branch")
# reducer widths of a branch site: "carry" grows the reducer feeding the pool branch's
# receiver by the pool projection's width (accuracy first); "paper" halves the 3x3 reducer
# and keeps the 5x5 one (DeepRebirth's GoogLeNet: fewer FLOPs, more error); a number f in
# (0, 1) (as text, e.g. "0.75") scales every reducer's carry width by f
BRANCH_WIDTHS = ("carry", "paper")
POOL_KINDS = ("max_pool2d", "avg_pool2d")
# ops that are not tensor (learned) layers: what a streamline chain absorbs
NON_TENSOR_OPS = ("max_pool2d", "avg_pool2d", "lrn", "batch_norm", "scale")
# elementwise activations a chain passes and its rebirth conv re-applies at its end (a ReLU
# in the middle of a block moves to the end: exact for max pools, learned otherwise)
ACTIVATIONS = ("relu", "prelu", "leaky_relu", "clip", "relu6")
# activations whose output is a ReLU's where it matters for fitting (lower bound 0)
RELU_LIKE = ("relu", "relu6", "clip")
# ops through which a chain stays a linear function of the conv output
LINEAR_OPS = ("avg_pool2d", "batch_norm", "scale")


def width_fraction(branch_widths: str) -> float | None:
    """The fraction of a numeric branch-widths setting ("0.75" -> 0.75); None for a named
    one or anything else (``analysis.check_settings`` says which settings are valid)."""
    try:
        value = float(branch_widths)
    except (TypeError, ValueError):
        return None
    return value if 0 < value < 1 else None


@dataclasses.dataclass
class ConvSpec:
    """One convolution of a plan: the layer it replaces and its (new) geometry."""

    replaces: str
    in_channels: int
    out_channels: int
    kernel: list
    stride: list
    padding: list  # [top, left, bottom, right]
    groups: int = 1

    def output_hw(self, in_hw) -> list:
        return [
            (in_hw[d] + self.padding[d] + self.padding[d + 2] - self.kernel[d]) // self.stride[d] + 1
            for d in range(2)
        ]

    def describe(self) -> str:
        k, s, p = self.kernel, self.stride, self.padding
        text = f"{self.in_channels}->{self.out_channels} {k[0]}x{k[1]}/s{s[0]}"
        if s[0] != s[1]:
            text += f"x{s[1]}"
        if any(p):
            text += " p" + ",".join(str(v) for v in p)
        if self.groups != 1:
            text += f" g{self.groups}"
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConvSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown conv field(s) {sorted(unknown)}")
        missing = fields - set(data) - {"groups"}
        if missing:
            raise ValueError(f"missing conv field(s) {sorted(missing)}")
        spec = cls(**data)
        spec.kernel, spec.stride, spec.padding = (
            _int_list(spec.kernel, 2, "kernel"), _int_list(spec.stride, 2, "stride"),
            _int_list(spec.padding, 4, "padding"))
        for name in ("in_channels", "out_channels", "groups"):
            value = getattr(spec, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if min(spec.kernel + spec.stride) < 1 or min(spec.padding) < 0:
            raise ValueError("kernel and stride must be >= 1 and padding >= 0")
        if spec.in_channels % spec.groups or spec.out_channels % spec.groups:
            raise ValueError(f"groups={spec.groups} must divide in_channels and out_channels")
        return spec


def _int_list(value, n, name):
    if isinstance(value, int):
        value = [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(
            isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be a list of {n} integers, got {value!r}")
    return list(value)


@dataclasses.dataclass
class Branch:
    """One branch of an inception module, from the tensor it forks from to the concat."""

    convs: list  # layer names of its convs, in order
    kernels: list  # [kh, kw] of each conv
    out_channels: int  # width it contributes to the concat
    pool: str | None  # layer name of its pool, if any
    pool_window: list | None  # that pool's [kh, kw]
    ops: list  # op kinds from the fork side, e.g. ["max_pool2d", "conv2d", "relu"]

    @property
    def last_conv(self) -> str:
        return self.convs[-1]

    @property
    def starts_with_pool(self) -> bool:
        """The non-tensor branch DeepRebirth merges away: pool first, then its projection."""
        return self.pool is not None and self.ops[0] in POOL_KINDS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Branch":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - fields or fields - set(data):
            raise ValueError(f"a branch needs exactly the keys {sorted(fields)}")
        return cls(**data)


@dataclasses.dataclass
class Absorb:
    """Which branch of a branch site takes over which: the pool branch's conv goes into
    ``pool_into``; optionally the 1x1 branch ``one_by_one`` into ``one_by_one_into`` (all are
    the last conv of a branch). Users may edit these in a plan."""

    pool_branch: str | None = None
    pool_into: str | None = None
    one_by_one: str | None = None
    one_by_one_into: str | None = None

    def pairs(self) -> list:
        """[(source key, into key, source conv, receiving conv)] of the merges it asks for."""
        return [(source, into, getattr(self, source), getattr(self, into))
                for source, into in (("pool_branch", "pool_into"),
                                     ("one_by_one", "one_by_one_into"))
                if getattr(self, source) is not None or getattr(self, into) is not None]

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "Absorb":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - fields:
            raise ValueError(f"absorb takes the keys {sorted(fields)}")
        return cls(**{k: str(v) for k, v in data.items()})


@dataclasses.dataclass
class RebirthSite:
    """A block of the network that one or more rebirth convolutions replace."""

    id: str
    kind: str  # "streamline" | "branch"
    ops: list  # op kinds in order, e.g. ["conv2d", "relu", "max_pool2d", "lrn"]
    layers: list  # source layer names of the block's convs, pools, LRNs, BNs, concat
    old_conv: list  # ConvSpec of each conv the site rewrites, as in the source model
    new_conv: list  # ConvSpec of each rebirth conv (same order as old_conv)
    exact: bool
    enabled: bool = True
    input_hw: list = dataclasses.field(default_factory=list)
    output_hw: list = dataclasses.field(default_factory=list)
    note: str = ""
    # branch sites: the module's branches (Branch) and which absorbs which (see BranchSlimming)
    branches: list = dataclasses.field(default_factory=list)
    absorb: Absorb | None = None
    # a streamline site that folds the stride-2 pool after an inception concat into the
    # branch convs feeding it: the concat's layer name (its branch site has this id)
    pooled_concat: str | None = None

    def to_dict(self) -> dict:
        data = {
            "id": self.id, "kind": self.kind, "enabled": self.enabled, "exact": self.exact,
            "ops": list(self.ops), "layers": list(self.layers),
            "input_hw": list(self.input_hw), "output_hw": list(self.output_hw),
            "old_conv": [c.to_dict() for c in self.old_conv],
            "new_conv": [c.to_dict() for c in self.new_conv],
        }
        if self.branches:
            data["branches"] = [b.to_dict() for b in self.branches]
            data["absorb"] = self.absorb.to_dict() if self.absorb else {}
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RebirthSite":
        ops, layers = list(data["ops"]), list(data.get("layers", []))
        absorb = data.get("absorb")
        return cls(
            id=str(data["id"]), kind=str(data["kind"]), ops=ops, layers=layers,
            old_conv=[ConvSpec.from_dict(dict(c)) for c in data["old_conv"]],
            new_conv=[ConvSpec.from_dict(dict(c)) for c in data["new_conv"]],
            exact=bool(data["exact"]), enabled=data.get("enabled", True),
            input_hw=list(data.get("input_hw", [])), output_hw=list(data.get("output_hw", [])),
            note=str(data.get("note", "")),
            branches=[Branch.from_dict(b) for b in data.get("branches", [])],
            absorb=Absorb.from_dict(absorb) if absorb else None,
            # the file format records the folded concat as the chain's first layer
            pooled_concat=layers[0] if ops[:1] == ["concat"] and layers else None)


@dataclasses.dataclass
class Window:
    """A sliding window along one spatial axis: conv or pool kernel, stride, pads."""

    kernel: int
    stride: int
    pad_before: int
    pad_after: int
    ceil_mode: bool = False


def compose_windows(windows):
    """Receptive field, total stride and top/left offset of a stack of windows."""
    rf, jump, offset = 1, 1, 0
    for w in windows:
        rf += (w.kernel - 1) * jump
        offset += w.pad_before * jump
        jump *= w.stride
    return rf, jump, offset


def solve_padding(in_size, out_size, kernel, stride, offset, rf):
    """(pad_before, pad_after) giving exactly out_size outputs, centred on the original
    receptive field; None when no non-negative padding does."""
    pad_before = max(offset - (rf - kernel) // 2, 0)
    # floor((in + pb + pa - k) / s) + 1 == out  <=>  lo <= pa <= hi
    lo = (out_size - 1) * stride + kernel - in_size - pad_before
    hi = out_size * stride + kernel - in_size - pad_before - 1
    if hi < 0:
        pad_before += hi  # too many outputs: shift the window start down instead
        lo, hi = lo - hi, 0
        if pad_before < 0:
            return None
    pad_after = max(lo, 0)
    if pad_after > hi:
        return None
    return pad_before, pad_after


def rebirth_geometry(windows_hw, in_hw, out_hw, policy, exact):
    """Kernel, stride and padding of the conv replacing a conv+pool stack, per axis.

    windows_hw: per axis (h, w) the list of Windows (the conv first). Returns
    (kernel, stride, padding[t, l, b, r], note) or raises ValueError with the reason.
    """
    kernel, stride, pad = [0, 0], [0, 0], [0, 0, 0, 0]
    notes = []
    if len(windows_hw[0]) == 1:  # no pool in the chain: the conv keeps its geometry
        h, w = windows_hw
        return ([h[0].kernel, w[0].kernel], [h[0].stride, w[0].stride],
                [h[0].pad_before, w[0].pad_before, h[0].pad_after, w[0].pad_after], "")
    for d in range(2):
        windows = windows_hw[d]
        rf, jump, offset = compose_windows(windows)
        conv_k = windows[0].kernel
        if exact:
            candidates = [rf]
        elif policy == "keep-kernel":
            step = 2 if conv_k % 2 else 1  # stay odd so the window keeps a centre
            candidates = list(range(conv_k, max(rf, conv_k) + 1, step))
            if candidates[-1] != max(rf, conv_k):
                candidates.append(max(rf, conv_k))
        else:
            candidates = [rf]
        for k in candidates:
            solved = solve_padding(in_hw[d], out_hw[d], k, jump, offset, rf)
            if solved is not None:
                break
        else:
            raise ValueError(
                f"no {candidates[-1]}-wide stride-{jump} conv maps {in_hw[d]} to "
                f"{out_hw[d]} outputs with non-negative padding")
        if exact and solved[0] != offset:
            raise ValueError("the closed-form merge needs the original padding offset")
        if k != conv_k and policy == "keep-kernel" and not exact:
            notes.append(f"kernel grown {conv_k}->{k} so the output stays {out_hw[d]} wide")
        kernel[d], stride[d] = k, jump
        pad[d], pad[d + 2] = solved
    return kernel, stride, pad, "; ".join(dict.fromkeys(notes))


def weight_keys(site: RebirthSite) -> list:
    """(replaces, weight key, bias key) per rebirth conv in a weights file (.npz):
    ``<site id>/weight`` for a single conv, ``<site id>/<conv layer>/weight`` for several."""
    if len(site.new_conv) == 1:
        return [(site.new_conv[0].replaces, f"{site.id}/weight", f"{site.id}/bias")]
    return [(c.replaces, f"{site.id}/{c.replaces}/weight", f"{site.id}/{c.replaces}/bias")
            for c in site.new_conv]


def refit_keys(site: RebirthSite, layer: str) -> tuple:
    """Weight and bias keys of a consumer conv refitted after ``site`` (see finetune)."""
    return f"{site.id}/refit/{layer}/weight", f"{site.id}/refit/{layer}/bias"


def branch_groups(site: RebirthSite) -> dict:
    """The slimmed layout of a branch site: {receiving branch index: indices of the branches
    its last conv now computes, in concat order} (indices into ``site.branches``).

    A receiver's last conv outputs the channels of the branches it covers in their concat
    order, so the module's output channel order is unchanged. Raises ValueError when
    ``absorb`` names a conv that is not a branch's last conv.
    """
    by_last = {b.last_conv: i for i, b in enumerate(site.branches)}
    groups = {}
    for source, into, source_conv, into_conv in (site.absorb or Absorb()).pairs():
        for key, name in ((source, source_conv), (into, into_conv)):
            if name not in by_last:
                raise ValueError(f"absorb.{key} '{name}' is not the last conv of a branch "
                                 f"(one of {sorted(by_last)})")
        src, dst = by_last[source_conv], by_last[into_conv]
        if src == dst or src in groups or any(src in c for c in groups.values()):
            raise ValueError(f"absorb.{source} '{source_conv}' is merged twice or into itself")
        groups.setdefault(dst, [dst]).append(src)
    for receiver in groups:
        if any(receiver in covered and receiver != r for r, covered in groups.items()):
            raise ValueError(f"branch '{site.branches[receiver].last_conv}' both absorbs "
                             "and is absorbed")
    return {r: sorted(c) for r, c in sorted(groups.items())}


def branch_conv_layout(site: RebirthSite, groups=None) -> list:
    """(layer name, role, receiver index) of each conv a branch site rewrites, in the order
    of ``old_conv``/``new_conv``: per receiving branch its 1x1 reducer (role "reducer",
    only for a reducer -> conv branch) then its last conv (role "grown")."""
    groups = branch_groups(site) if groups is None else groups
    layout = []
    for receiver in groups:
        convs = site.branches[receiver].convs
        if len(convs) == 2:
            layout.append((convs[0], "reducer", receiver))
        layout.append((convs[-1], "grown", receiver))
    return layout


def site_conv_weights(site: RebirthSite, weights, kernels=None) -> list:
    """[(W OIHW, b)] float32 of each rebirth conv of ``site``, from ``weights`` (a mapping of
    ``weight_keys`` to arrays), checked against the plan's shapes. ``kernels``: the kernel of
    each conv where the plan does not fix it (a branch conv keeps the module's). Raises
    RebirthError naming the site and the key that is missing or of the wrong shape.
    ``weights=None``: the structure only -- seeded placeholder weights of the plan's shapes
    (for inspecting and timing the slimmed graph; its outputs mean nothing)."""
    result = []
    for i, (spec, (_, wkey, bkey)) in enumerate(zip(site.new_conv, weight_keys(site))):
        kernel = list(kernels[i]) if kernels is not None else list(spec.kernel)
        if weights is None:
            result.append(_placeholder_conv(spec, kernel, wkey))
            continue
        missing = [k for k in (wkey, bkey) if k not in weights]
        if missing:
            raise RebirthError(f"site '{site.id}': the weights have no '{missing[0]}'")
        weight, bias = np.asarray(weights[wkey]), np.asarray(weights[bkey])
        want = [spec.out_channels, spec.in_channels // spec.groups, *kernel]
        if list(weight.shape) != want:
            raise RebirthError(f"site '{site.id}': weight '{wkey}' has shape "
                               f"{list(weight.shape)}, the plan needs {want}")
        if list(bias.shape) != [spec.out_channels]:
            raise RebirthError(f"site '{site.id}': bias '{bkey}' has shape {list(bias.shape)}, "
                               f"the plan needs [{spec.out_channels}]")
        result.append((weight.astype("float32"), bias.astype("float32")))
    return result


def _placeholder_conv(spec, kernel, key) -> tuple:
    """Seeded (W, b) of a rebirth conv's shapes, He-scaled so activations stay finite."""
    import zlib

    rng = np.random.default_rng(zlib.crc32(key.encode()))
    fan_in = spec.in_channels // spec.groups * int(np.prod(kernel))
    weight = rng.standard_normal([spec.out_channels, spec.in_channels // spec.groups, *kernel])
    return ((weight * np.sqrt(2.0 / fan_in)).astype("float32"),
            np.zeros(spec.out_channels, dtype="float32"))
