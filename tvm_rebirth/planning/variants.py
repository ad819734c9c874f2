"""The variants a plan may choose per site, and the site groups that are chosen together.

    choices = site_choices(mod)
    choices.groups          # [Group]: sites whose rewrites share a conv are one group
    group.combos            # [{site id: variant name}]: every joint choice, "off" first
    choices.site(id, name)  # the RebirthSite of that variant (None for "off")

Streamline sites: ``keep-kernel`` (the conv's own kernel, grown only where the output shape
needs it), ``keep-receptive-field`` (a kernel covering the whole block), ``off``. Exact sites
(BatchNorm/scale folds, linear pools): ``exact`` or ``off``. Branch sites: ``carry`` (the
reducers carry the merged branches' widths), ``paper`` (DeepRebirth's GoogLeNet widths),
``0.75`` (reducers at 0.75 of carry's widths), ``off``. Variants with the same convs are
listed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

from ..passes import analyze_sites
from ..passes.blocks import site_groups

OFF = "off"
# (kernel policy, branch widths) of each analysis, and the variant names its sites take;
# branch reducers at 0.75 of carry's widths sit between carry and paper
_ANALYSES = (("keep-kernel", "carry"), ("keep-receptive-field", "paper"), ("keep-kernel", "0.75"))


@dataclasses.dataclass
class Group:
    """Sites costed and chosen together (see module doc)."""

    sites: list  # site ids, binding order
    combos: list  # [{site id: variant name}], the all-"off" combo first
    # {site id: {variant: hash of its new convs}}: cached costs follow the convs, not names
    conv_hashes: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return "|".join(self.sites)


@dataclasses.dataclass
class SiteChoices:
    """Every site's variants in a module (``site_choices``)."""

    analysis: object  # the keep-kernel / carry SiteAnalysis (site order, traces, blocks)
    variants: dict  # site id -> {variant name: RebirthSite}
    groups: list  # [Group]

    def site(self, site_id: str, variant: str):
        """The RebirthSite of ``variant`` of ``site_id``; None for "off"."""
        return None if variant == OFF else self.variants[site_id][variant]

    def names(self, site_id: str) -> list:
        return list(self.variants[site_id]) + [OFF]

    def slimming_plan(self, combos) -> "SlimmingPlan":
        """What the slimming passes need to apply ``combos`` ({group key or any key:
        {site id: variant}}): the chosen variants' sites."""
        return SlimmingPlan([self.site(s, v) for combo in combos for s, v in combo.items()
                             if v != OFF])


@dataclasses.dataclass
class SlimmingPlan:
    """The slimming passes' view of a plan (``rebirth_pipeline(plan, weights)``): some
    sites, enabled, and the kernel policy their module is analysed with."""

    sites: list
    policy: str = "keep-kernel"


def conv_hash(site) -> str:
    """A short hash of a site variant's new convs (what its cost and accuracy depend on)."""
    convs = json.dumps([c.to_dict() for c in site.new_conv], sort_keys=True)
    return hashlib.sha256(convs.encode()).hexdigest()[:12]


def _variant_name(site, policy: str, widths: str) -> str:
    if site.exact:
        return "exact"
    return widths if site.kind == "branch" else policy


def site_choices(mod, kinds=("streamline", "branch")) -> SiteChoices:
    """The variants of every site of ``kinds`` in ``mod`` and the groups they form."""
    analyses = [analyze_sites(mod, policy, kinds, branch_widths=widths)
                for policy, widths in _ANALYSES]
    variants = {}
    for analysis, (policy, widths) in zip(analyses, _ANALYSES):
        for site in analysis.sites:
            options = variants.setdefault(site.id, {})
            convs = [c.to_dict() for c in site.new_conv]
            name = _variant_name(site, policy, widths)
            # a streamline site is the same for every branch-widths setting: the first kept
            if name in options or any([c.to_dict() for c in other.new_conv] == convs
                                      for other in options.values()):
                continue
            # a finder may leave a site off by default; every variant is costed enabled
            options[name] = dataclasses.replace(site, enabled=True)
    base = analyses[0]
    groups = []
    for ids in site_groups(base):
        names = [list(variants[i]) + [OFF] for i in ids]
        combos = [dict(zip(ids, pick)) for pick in itertools.product(*names)]
        combos.sort(key=lambda c: sum(v != OFF for v in c.values()))  # all-off first
        hashes = {i: {name: conv_hash(site) for name, site in variants[i].items()} for i in ids}
        groups.append(Group(sites=ids, combos=combos, conv_hashes=hashes))
    return SiteChoices(analysis=base, variants=variants, groups=groups)
