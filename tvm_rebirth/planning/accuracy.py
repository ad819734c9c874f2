"""Accuracy costs of site variants (``learn.finetune.variant_errors``), cached beside the cost
table per model, calibration images, variant, fitting method (``learn.fit.FIT_VERSION``) and
what is measured (``COST_VERSION``), so planning a model again costs seconds."""

from __future__ import annotations

import hashlib
import logging

from .costs import cache_path, read_cache, write_cache
from .variants import conv_hash

logger = logging.getLogger(__name__)

# bump when ``variant_errors`` measures another error (keys the cache); 3: at the logits
COST_VERSION = 3


def _variant_key(site_id: str, name: str, site) -> str:
    return f"{site_id}={name}:{conv_hash(site)}"


def accuracy_costs(model, choices, images, kinds, wanted=None) -> dict:
    """{site id: {variant: held-out relative error of the output}} of every variant of
    ``choices`` on ``images`` (their bytes key the cache); of the learned ones, only the
    (site id, variant) pairs in ``wanted`` (None: all); exact variants cost 0. ``images``
    None when every variant is exact."""
    import numpy as np

    from ..learn.finetune import variant_errors
    from ..learn.fit import FIT_VERSION

    if images is None:
        return variant_errors(model, choices, None, kinds)
    digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    path = cache_path(model, "accuracy", [digest.hexdigest(), FIT_VERSION, COST_VERSION])
    keys = {(s, n): _variant_key(s, n, site) for s, options in choices.variants.items()
            for n, site in options.items()
            if not site.exact and (wanted is None or (s, n) in wanted)}
    cached = read_cache(path)
    if all(k in cached for k in keys.values()):
        logger.info(f"[plan] every accuracy cost of {model.name} is cached ({path})")
        errors = variant_errors(model, choices, None, kinds, wanted=set())  # exact ones: 0
        for (site_id, name), key in keys.items():
            errors[site_id][name] = cached[key]
        return errors
    errors = variant_errors(model, choices, images, kinds, wanted)
    cached.update({keys[(s, n)]: e for s, by_name in errors.items() for n, e in by_name.items()
                   if (s, n) in keys})
    write_cache(path, cached)
    return errors
