"""FindRebirthSites: annotate a module, right after import, with the blocks DeepRebirth can slim.

Three shapes of block are found (``analysis.analyze_sites``; ``site.RebirthSite``):

* streamline chains -- a conv2d (+ bias) followed by non-tensor layers in any order, the
  ReLU kept (``find_streamline``)::

      lv  = R.nn.conv2d(x, W, strides=[2, 2], padding=[3, 3, 3, 3])
      lv2 = R.add(lv, b)
      lv3 = R.nn.relu(lv2)
      lv4 = R.nn.max_pool2d(lv3, [3, 3], strides=[2, 2])
      lv5 ... lv12 = <LRN>
    becomes the site  conv1/7x7_s2+pool1/3x3_s2+pool1/norm1  (new conv 7x7/s4)

* a stride-2 pool after an inception concat, absorbed by the last conv of every branch;
* inception branch groups, merged horizontally by BranchSlimming (``find_branch``).

The module is returned unchanged except for the ``rebirth_sites`` attribute (JSON list of
``RebirthSite.to_dict()``).
"""

from __future__ import annotations

import json

import tvm

from .analysis import analyze_sites, check_settings
from .site import SITE_KINDS

SITES_ATTR = "rebirth_sites"


@tvm.transform.module_pass(opt_level=0, name="FindRebirthSites")
class FindRebirthSites:
    """Analysis pass: ``FindRebirthSites(policy, kinds, func_name, branch_widths)(mod)`` returns
    ``mod`` with the ``rebirth_sites`` attribute. For the sites as objects, with where they sit
    and what was rejected, call ``analyze_sites`` instead.

    Parameters
    ----------
    policy : str
        "keep-kernel" (the paper: stride multiplied, kernel kept) or "keep-receptive-field".
    kinds : sequence of str
        Site kinds to look for: "streamline", "branch".
    func_name : str
        The function to analyse.
    branch_widths : str
        Reducer widths of branch sites: "carry", "paper", or a fraction of carry's widths
        between 0 and 1 as text ("0.75"); see ``site.BRANCH_WIDTHS``.
    """

    def __init__(self, policy: str = "keep-kernel", kinds=SITE_KINDS, func_name: str = "main",
                 branch_widths: str = "carry"):
        check_settings(policy, kinds, branch_widths)
        self.policy, self.kinds, self.func_name = policy, tuple(kinds), func_name
        self.branch_widths = branch_widths

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        sites = analyze_sites(mod, self.policy, self.kinds, self.func_name,
                              self.branch_widths).sites
        return mod.with_attr(SITES_ATTR, json.dumps([s.to_dict() for s in sites]))


def find_rebirth_sites(mod, policy="keep-kernel", kinds=SITE_KINDS, func_name="main",
                       branch_widths="carry") -> list:
    """The RebirthSites of ``mod[func_name]`` (``analyze_sites(...).sites``)."""
    return analyze_sites(mod, policy, kinds, func_name, branch_widths).sites
