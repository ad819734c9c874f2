"""The fine-tune stage: learn every rebirth conv of a plan from unlabeled images.

Sites are fitted bottom-up. The original model gives each site's target output; each site's
input is captured from the network with every site below it already slimmed, so a site's
fit absorbs the errors of those below instead of compounding them unseen. Exact sites are
computed in closed form and need no images.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from .build import Runner
from .errors import RebirthError
from .fit import conv_forward, fit_rebirth_conv
from .passes import FindRebirthSites, StreamlineSlimming, exact_site_weights, weight_keys
from .weights import RebirthWeights


def _log(message):
    print(message, file=sys.stderr, flush=True)


def capture_module(mod, site_ids, what, policy="keep-kernel", func_name="main"):
    """A module returning, for each site, its conv inputs (``what="inputs"``) or its output
    (``what="end"``), computing only what those need. Returns (module, [count per site])."""
    import tvm
    from tvm import relax

    plain = relax.transform.ToNonDataflow()(mod)
    plain = tvm.IRModule(dict(plain.functions), attrs=mod.attrs)
    finder = FindRebirthSites(policy, ["streamline"], func_name)
    finder.find(plain)
    outputs, counts = [], []
    for site_id in site_ids:
        trace = finder.traces.get(site_id)
        if trace is None:
            raise RebirthError(f"site '{site_id}': not found while capturing activations")
        values = list(trace.inputs) if what == "inputs" else [trace.end]
        outputs.extend(values)
        counts.append(len(values))
    func = plain[func_name]
    body = relax.BlockBuilder().normalize(relax.SeqExpr(func.body.blocks, relax.Tuple(outputs)))
    captured = relax.analysis.remove_all_unused(
        relax.Function(func.params, body, attrs=func.attrs)).with_attr("global_symbol", "main")
    return tvm.IRModule({"main": captured}), counts


def run_all(runner, images, label, log=_log):
    """Run every image through ``runner``; returns one stacked array per output."""
    columns = None
    start = time.time()
    for i, image in enumerate(images):
        outs = runner(image[None])
        if columns is None:
            columns = [[] for _ in outs]
        for column, out in zip(columns, outs):
            column.append(out[0])
        if (i + 1) % 64 == 0 or i + 1 == len(images):
            log(f"[finetune]   {label}: {i + 1}/{len(images)} images "
                f"({time.time() - start:.1f}s)")
    return [np.stack(c) for c in columns]


def _with_enabled(plan, site_ids):
    sites = [dataclasses.replace(s, enabled=s.id in site_ids) for s in plan.sites]
    return dataclasses.replace(plan, sites=sites)


def finetune(model, plan, images=None, calibration="", log=_log) -> tuple:
    """Learn the plan's enabled streamline sites. Returns (RebirthWeights, report dict)."""
    start = time.time()
    sites = plan.enabled_sites("streamline")
    arrays, report, done = {}, [], []
    for site in sites:
        if site.exact:
            weight, bias = exact_site_weights(model.mod, site.id)
            (_, wkey, bkey), = weight_keys(site)
            arrays[wkey], arrays[bkey] = weight, bias
            done.append(site.id)
            report.append({"id": site.id, "exact": True, "rel_error": None,
                           "method": "closed form", "seconds": 0.0})
            log(f"[finetune] {site.id}: exact, closed form")
    learned = [s for s in sites if not s.exact]
    if learned:
        if images is None or len(images) == 0:
            raise RebirthError("the plan has learned sites but no calibration images were given")
        log(f"[finetune] capturing the original outputs of {len(learned)} site(s) on "
            f"{len(images)} images")
        capture, _ = capture_module(model.mod, [s.id for s in learned], "end", plan.policy)
        targets = dict(zip([s.id for s in learned],
                           run_all(Runner(capture), images, "original model")))
    for site in learned:
        t = time.time()
        current = StreamlineSlimming(_with_enabled(plan, set(done)), arrays)(model.mod)
        capture, _ = capture_module(current, [site.id], "inputs", plan.policy)
        inputs = run_all(Runner(capture), images, f"inputs of {site.id}")
        target = targets.pop(site.id)
        finder = FindRebirthSites(plan.policy, ["streamline"])
        finder.find(current)
        relus = finder.traces[site.id].relu
        # every 8th image is held out: the reported error is measured on unseen images
        held = np.arange(len(target)) % 8 == 7 if len(target) >= 8 else np.zeros(len(target), bool)
        check = held if held.any() else ~held
        offset, sq_err, sq_fit = 0, 0.0, 0.0
        for (replaces, wkey, bkey), spec, x, relu in zip(weight_keys(site), site.new_conv,
                                                         inputs, relus):
            y = target[:, offset:offset + spec.out_channels]
            offset += spec.out_channels
            result = fit_rebirth_conv(x[~held], y[~held], spec, relu=relu)
            arrays[wkey], arrays[bkey] = result.weight, result.bias
            pred = conv_forward(x[check], result.weight, result.bias, spec)
            pred = np.maximum(pred, 0) if relu else pred
            sq_err += float(np.sum((pred - y[check]).astype(np.float64) ** 2))
            sq_fit += (result.rel_error ** 2) * float(np.sum(y[~held].astype(np.float64) ** 2))
        total = max(float(np.sum(target[check].astype(np.float64) ** 2)), 1e-12)
        total_fit = max(float(np.sum(target[~held].astype(np.float64) ** 2)), 1e-12)
        entry = {"id": site.id, "exact": False, "rel_error": round((sq_err / total) ** 0.5, 6),
                 "rel_error_fit": round((sq_fit / total_fit) ** 0.5, 6),
                 "held_out_images": int(held.sum()),
                 "method": "ridge least squares + ReLU-aware refinement",
                 "seconds": round(time.time() - t, 2)}
        report.append(entry)
        done.append(site.id)
        log(f"[finetune] {site.id}: relative error {entry['rel_error']:.4f} on "
            f"{entry['held_out_images']} held-out images (fit {entry['rel_error_fit']:.4f}), "
            f"{entry['seconds']}s")
    order = {s.id: i for i, s in enumerate(plan.sites)}
    report.sort(key=lambda r: order[r["id"]])
    meta = {"calibration": calibration, "sites": report,
            "seconds": round(time.time() - start, 2), "model": plan.model_name}
    return RebirthWeights(arrays=arrays, plan_sha256=plan.sha256, meta=meta), meta
