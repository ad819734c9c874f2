"""The site analysis: every rebirth site of one Relax function, computed once and handed to
whoever needs it (the slimming passes, plan validation, the fine-tune stage).

    analysis = analyze_sites(mod, policy="keep-kernel", kinds=("streamline", "branch"))
    analysis.sites        # [RebirthSite], in binding order, ids unique
    analysis.rejected     # [Rejection(id, reason)]: blocks that look like sites but are not
    analysis.trace(id)    # StreamlineTrace | BranchTrace: where the site sits
    analysis.graph        # the Dataflow the traces' vars belong to
    analysis.mod          # the module analysed: ``mod`` after PrepareForSites (the one to
                          # rewrite or run with the traces' vars)

Site ids come from source layer names (``AttachLayerNames``) or, without them, positions.

The slimming passes record the ids of the sites they rewrote in the module attribute
``rebirth_slimmed_sites`` (``slimmed_sites``, ``mark_slimmed``): a site listed there is
already applied, so slimming a slimmed module again is a no-op, while a site that is neither
in the module nor recorded still raises RebirthError naming it.
"""

from __future__ import annotations

import dataclasses

import tvm

from .dataflow import Dataflow, op_name
from .errors import RebirthError
from .find_branch import BranchFinder
from .find_streamline import Found, Rejection, StreamlineFinder
from .layers import LrnMatcher, attached_names, layer_names
from .prepare import PrepareForSites
from .site import (BRANCH_WIDTHS, KERNEL_POLICIES, SITE_KINDS, ConvSpec, RebirthSite,
                   width_fraction)
from .traces import ConvBlock, conv_block_weights


SLIMMED_SITES_ATTR = "rebirth_slimmed_sites"  # module attribute: ids of the sites applied


def slimmed_sites(mod: tvm.IRModule) -> set:
    """Ids of the sites the slimming passes already applied to ``mod``."""
    if mod.attrs is None or SLIMMED_SITES_ATTR not in mod.attrs:
        return set()
    return {str(s) for s in mod.attrs[SLIMMED_SITES_ATTR]}


def mark_slimmed(mod: tvm.IRModule, site_ids) -> tvm.IRModule:
    """``mod`` with ``site_ids`` added to its record of applied sites."""
    return mod.with_attr(SLIMMED_SITES_ATTR, sorted(slimmed_sites(mod) | set(site_ids)))


@dataclasses.dataclass
class SiteAnalysis:
    """What ``analyze_sites`` found in ``mod[func_name]`` (see module doc)."""

    sites: list
    rejected: list
    traces: dict  # site id -> StreamlineTrace | BranchTrace
    graph: Dataflow
    mod: tvm.IRModule = None  # the prepared module the vars belong to

    def site(self, site_id: str) -> RebirthSite | None:
        return next((s for s in self.sites if s.id == site_id), None)

    def trace(self, site_id: str):
        """Where site ``site_id`` sits; RebirthError naming it when the module lacks it."""
        trace = self.traces.get(site_id)
        if trace is None:
            raise RebirthError(f"site '{site_id}': not in the module")
        return trace

    def conv_spec(self, block: ConvBlock) -> ConvSpec:
        """The geometry of a ConvBlock's conv as this module has it."""
        return self.graph.conv_spec(block.conv, block.name)

    def conv_weights(self, block: ConvBlock) -> tuple:
        """(W [OIHW], b) float32 of a ConvBlock as the module computes it (bias add folded)."""
        return conv_block_weights(self.graph, block)


def check_settings(policy: str, kinds, branch_widths: str) -> None:
    """ValueError naming the bad setting of a site search."""
    if policy not in KERNEL_POLICIES:
        raise ValueError(f"unknown kernel policy '{policy}' (use one of {KERNEL_POLICIES})")
    bad = [k for k in kinds if k not in SITE_KINDS]
    if bad:
        raise ValueError(f"unknown site kind(s) {bad} (use {SITE_KINDS})")
    if branch_widths not in BRANCH_WIDTHS and width_fraction(branch_widths) is None:
        raise ValueError(f"unknown branch widths '{branch_widths}' (use one of "
                         f"{BRANCH_WIDTHS}, or a fraction of carry between 0 and 1)")


def analyze_sites(mod: tvm.IRModule, policy: str = "keep-kernel", kinds=SITE_KINDS,
                  func_name: str = "main", branch_widths: str = "carry") -> SiteAnalysis:
    """Find every rebirth site of ``kinds`` in ``mod[func_name]`` (see module doc)."""
    check_settings(policy, kinds, branch_widths)
    mod = PrepareForSites(func_name)(mod)
    graph = Dataflow(mod[func_name])
    lrns = LrnMatcher().match(graph)
    names = layer_names(graph, lrns, attached_names(mod))
    streamline = StreamlineFinder(graph, names, lrns, policy)
    branch = BranchFinder(graph, names, branch_widths)
    results = []
    for binding in graph.bindings:
        op = op_name(binding.value)
        if op == "relax.nn.conv2d" and "streamline" in kinds:
            results.append(streamline.from_conv(binding.var))
        elif op == "relax.concat":
            if "streamline" in kinds:
                results.append(streamline.from_concat(binding.var))
            if "branch" in kinds:
                results.append(branch.from_concat(binding.var))
    results.append(_nothing_to_find(graph, func_name))
    found = [r for r in results if isinstance(r, Found)]
    seen = {}
    for item in found:  # ids must be unique even in oddly named models
        site = item.site
        if site.id in seen:
            seen[site.id] += 1
            site.id = f"{site.id}#{seen[site.id]}"
        else:
            seen[site.id] = 0
    return SiteAnalysis(sites=[f.site for f in found],
                        rejected=[r for r in results if isinstance(r, Rejection)],
                        traces={f.site.id: f.trace for f in found}, graph=graph, mod=mod)


def _nothing_to_find(graph: Dataflow, func_name: str) -> Rejection | None:
    """Why a function holds no conv a site could start from, when it holds none."""
    ops = [op_name(b.value) for b in graph.bindings]
    if "relax.nn.conv2d" in ops:
        return None
    if "relax.call_tir" in ops:
        return Rejection(func_name, "no relax.nn.conv2d left: the module is already legalized "
                         "(LegalizeOps turned the ops into call_tir); find and slim sites "
                         "before legalization")
    return Rejection(func_name, "no relax.nn.conv2d in the function")


def block_difference(site: RebirthSite, ref: RebirthSite) -> str | None:
    """Why the module's block ``ref`` is not the block plan site ``site`` was made for, or
    None when it is (kind, ops, the convs a streamline site rewrites, a branch site's
    branches). The one structural check of a plan against a module."""
    if site.kind != ref.kind:
        return f"kind is '{ref.kind}' in the model, plan says '{site.kind}'"
    if list(site.ops) != list(ref.ops):
        return f"ops {site.ops} differ from the model's {ref.ops}"
    if site.kind == "streamline" and (
            [c.to_dict() for c in site.old_conv] != [c.to_dict() for c in ref.old_conv]):
        return "old_conv differs from the model's convolutions"
    if site.kind == "branch" and [b.convs for b in site.branches] != [
            b.convs for b in ref.branches]:
        return ("branches differ from the model's (only absorb and new_conv widths may be "
                "edited)")
    return None


def match_site(analysis: SiteAnalysis, site: RebirthSite) -> RebirthSite:
    """The module's own version of plan site ``site``; RebirthError naming the site when the
    module does not hold that block."""
    ref = analysis.site(site.id)
    if ref is None:
        raise RebirthError(f"site '{site.id}': not in the module (a plan for another model, "
                           f"or a module changed since it was planned; sites already slimmed "
                           f"are listed in its '{SLIMMED_SITES_ATTR}' attribute)")
    difference = block_difference(site, ref)
    if difference:
        raise RebirthError(f"site '{site.id}': the module's block differs from the plan: "
                           f"{difference}")
    return ref
