"""The fine-tune stage: learn every rebirth conv of a plan from unlabeled images.

Sites are fitted bottom-up. The original model gives each site's target output; each site's
input is captured from the network with every site below it already slimmed, so a site's
fit absorbs the errors of those below instead of compounding them unseen. Then the convs
that read the site's output are refitted the same way (layer-wise, to their original
outputs), which absorbs most of what one rebirth conv cannot express. Exact sites are
computed in closed form and need no images. Optionally (``e2e_images``, needs PyTorch) all
learned convs are then refined together by distilling the original model's outputs.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from .build import Runner
from .errors import RebirthError
from .fit import conv_forward, fit_rebirth_conv, pool_forward
from .passes import FindRebirthSites, StreamlineSlimming, exact_site_weights, weight_keys
from .passes.site import refit_keys
from .weights import RebirthWeights


def _log(message):
    print(message, file=sys.stderr, flush=True)


def capture_module(mod, select, policy="keep-kernel", func_name="main"):
    """A module returning the vars ``select(finder)`` picks from the sites FindRebirthSites
    traces in ``mod``, computing only what those need."""
    import tvm
    from tvm import relax

    plain = relax.transform.ToNonDataflow()(mod)
    plain = tvm.IRModule(dict(plain.functions), attrs=mod.attrs)
    finder = FindRebirthSites(policy, ["streamline"], func_name)
    finder.find(plain)
    outputs = select(finder)
    func = plain[func_name]
    body = relax.BlockBuilder().normalize(relax.SeqExpr(func.body.blocks, relax.Tuple(outputs)))
    captured = relax.analysis.remove_all_unused(
        relax.Function(func.params, body, attrs=func.attrs)).with_attr("global_symbol", "main")
    return tvm.IRModule({"main": captured})


def _trace(finder, site_id):
    trace = finder.traces.get(site_id)
    if trace is None:
        raise RebirthError(f"site '{site_id}': not found while capturing activations")
    return trace


def _consumers(finder, site_id, site_convs):
    """Consumer convs of a site that are not themselves fitted as part of a site."""
    return [c for c in _trace(finder, site_id).consumers if c.name not in site_convs]


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


def _fit_one(x, y, spec, relu, held, arrays, wkey, bkey):
    """Fit one conv on the non-held-out images; store it; return squared-error sums."""
    check = held if held.any() else ~held
    result = fit_rebirth_conv(x[~held], y[~held], spec, relu=relu)
    arrays[wkey], arrays[bkey] = result.weight, result.bias
    pred = conv_forward(x[check], result.weight, result.bias, spec)
    pred = np.maximum(pred, 0) if relu else pred
    fit_norm = float(np.sum(y[~held].astype(np.float64) ** 2))
    return (float(np.sum((pred - y[check]).astype(np.float64) ** 2)),
            float(np.sum(y[check].astype(np.float64) ** 2)),
            result.rel_error ** 2 * fit_norm, fit_norm)


def _combine(pieces):
    err, norm, fit_err, fit_norm = (sum(p[i] for p in pieces) for i in range(4))
    return {"rel_error": round((err / max(norm, 1e-12)) ** 0.5, 6),
            "rel_error_fit": round((fit_err / max(fit_norm, 1e-12)) ** 0.5, 6)}


def _refit_consumers(site, fits, consumers, finder, targets, held, arrays):
    """Refit the convs that read a freshly slimmed site to their original outputs. Their
    new input is the rebirth conv's output, computed in numpy from the site's captured
    inputs (through the same pools), so no extra TVM run is needed."""
    outs = []
    for wkey, bkey, spec, x, relu in fits:
        y = conv_forward(x, arrays[wkey], arrays[bkey], spec)
        outs.append(np.maximum(y, 0) if relu else y)
    slimmed = np.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    report = []
    for consumer in consumers:
        x = slimmed
        for pool in consumer.pools:
            x = pool_forward(x, **pool)
        spec = finder._conv_spec(consumer.conv, consumer.name)
        y = targets.pop((site.id, consumer.name))
        wkey, bkey = refit_keys(site, consumer.name)
        report.append({"layer": consumer.name,
                       **_combine([_fit_one(x, y, spec, consumer.relu, held, arrays,
                                            wkey, bkey)])})
    return report


def _refine_end_to_end(model, plan, arrays, images, epochs, log):
    """Distil the original outputs into every learned conv (rebirth and refitted)."""
    from .distill import distill

    trainable = {}
    for site in plan.enabled_sites("streamline"):
        if site.exact:
            continue
        for replaces, wkey, bkey in weight_keys(site):
            trainable[replaces] = (wkey, bkey)
        prefix = f"{site.id}/refit/"
        for key in list(arrays):
            if key.startswith(prefix) and key.endswith("/weight"):
                trainable[key[len(prefix):-len("/weight")]] = (key, key[:-len("weight")] + "bias")
    rebirth = StreamlineSlimming(plan, arrays)(model.mod)
    log(f"[finetune] end-to-end refinement of {len(trainable)} convs on {len(images)} images")
    learned, report = distill(model.mod, rebirth, trainable, images, epochs=epochs, log=log)
    for key, value in learned.items():
        arrays[key] = value.reshape(arrays[key].shape)
    return report


def finetune(model, plan, images=None, calibration="", log=_log,
             refit_consumers=True, e2e_images=None, e2e_epochs=8) -> tuple:
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
    site_convs = {c.replaces for s in sites for c in s.old_conv}
    if learned:
        if images is None or len(images) == 0:
            raise RebirthError("the plan has learned sites but no calibration images were given")
        log(f"[finetune] capturing the original outputs of {len(learned)} site(s) on "
            f"{len(images)} images")

        def original_targets(finder):
            outs = []
            for site in learned:
                outs.append(_trace(finder, site.id).end)
                if refit_consumers:
                    outs += [c.out for c in _consumers(finder, site.id, site_convs)]
            return outs
        columns = iter(run_all(Runner(capture_module(model.mod, original_targets, plan.policy)),
                               images, "original model"))
        finder = FindRebirthSites(plan.policy, ["streamline"])
        finder.find(model.mod)
        targets, consumer_targets = {}, {}
        for site in learned:
            targets[site.id] = next(columns)
            if refit_consumers:
                for c in _consumers(finder, site.id, site_convs):
                    consumer_targets[(site.id, c.name)] = next(columns)
    # every 8th image is held out: reported errors are measured on unseen images
    held = np.arange(len(images)) % 8 == 7 if images is not None and len(images) >= 8 \
        else np.zeros(0 if images is None else len(images), bool)
    for site in learned:
        t = time.time()
        current = StreamlineSlimming(_with_enabled(plan, set(done)), arrays)(model.mod)
        inputs = run_all(Runner(capture_module(
            current, lambda f: list(_trace(f, site.id).inputs), plan.policy)),
            images, f"inputs of {site.id}")
        target = targets.pop(site.id)
        finder = FindRebirthSites(plan.policy, ["streamline"])
        finder.find(current)
        relus = finder.traces[site.id].relu
        fits = [(wkey, bkey, spec, x, relu) for (_, wkey, bkey), spec, x, relu in
                zip(weight_keys(site), site.new_conv, inputs, relus)]
        offset, pieces = 0, []
        for wkey, bkey, spec, x, relu in fits:
            y = target[:, offset:offset + spec.out_channels]
            offset += spec.out_channels
            pieces.append(_fit_one(x, y, spec, relu, held, arrays, wkey, bkey))
        entry = {"id": site.id, "exact": False, **_combine(pieces),
                 "method": "ridge least squares + ReLU-aware refinement",
                 "held_out_images": int(held.sum())}
        done.append(site.id)
        consumers = _consumers(finder, site.id, site_convs) if refit_consumers else []
        if consumers:
            refit = _refit_consumers(site, fits, consumers, finder, consumer_targets, held,
                                     arrays)
            entry["refit"] = refit
            log(f"[finetune] {site.id}: refitted {', '.join(c.name for c in consumers)} "
                f"(held-out error {', '.join(str(r['rel_error']) for r in refit)})")
        entry["seconds"] = round(time.time() - t, 2)
        report.append(entry)
        log(f"[finetune] {site.id}: relative error {entry['rel_error']:.4f} on "
            f"{entry['held_out_images']} held-out images (fit {entry['rel_error_fit']:.4f}), "
            f"{entry['seconds']}s")
    e2e = None
    if e2e_images is not None and learned:
        e2e = _refine_end_to_end(model, plan, arrays, e2e_images, e2e_epochs, log)
    order = {s.id: i for i, s in enumerate(plan.sites)}
    report.sort(key=lambda r: order[r["id"]])
    meta = {"calibration": calibration, "sites": report,
            "seconds": round(time.time() - start, 2), "model": plan.model_name}
    if e2e is not None:
        meta["end_to_end"] = e2e
    return RebirthWeights(arrays=arrays, plan_sha256=plan.sha256, meta=meta), meta
