"""Plans that pay: each site's variants (variants.py), their cost measured on the target
(costs.py) and the selection under an accuracy budget (selection.py); ``flow.select_plan``
runs them in that order, with ``learn.finetune.variant_errors`` for the accuracy costs."""
