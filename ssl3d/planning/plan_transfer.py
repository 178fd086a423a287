"""Plan transfer: the pretraining plans re-targeted to a labeled dataset for fine-tuning with stock nnU-Net."""
from __future__ import annotations

import copy
from typing import Sequence


def finetune_plans(pretrain_plans: dict, architecture: dict, dataset_name: str, plans_name: str,
                   options: dict, patch_size: Sequence[int] | None = None) -> dict:
    """The pretraining plans re-targeted to a labeled dataset.

    Spacing, transpose, patch size and normalization (with the pool's intensity statistics, i.e. the input
    distribution the encoder was trained on) are kept; the architecture is the method's downstream network.
    A fixed CT window has no nnU-Net scheme, so it becomes nnU-Net's CTNormalization with statistics that
    make it the same map: clip to [lo, hi], subtract lo, divide by hi - lo. ``patch_size`` replaces the
    planned patch when the method trained on another one (Swin needs multiples of 32).
    """
    plans = copy.deepcopy(pretrain_plans)
    plans.pop("continue_training", None)
    cfg = plans["configurations"]["3d_fullres"]
    fg = plans["foreground_intensity_properties_per_channel"]
    for c, scheme in enumerate(cfg["normalization_schemes"]):
        if scheme == "CTWindowNormalization":
            lo, hi = cfg["ssl3d"]["normalization_kwargs"][c]["window"]
            fg[str(c)] = {**fg.get(str(c), {}), "mean": lo, "std": hi - lo, "percentile_00_5": lo,
                          "percentile_99_5": hi}
            cfg["normalization_schemes"][c] = "CTNormalization"
    plans["dataset_name"] = dataset_name
    plans["plans_name"] = plans_name
    cfg["architecture"] = copy.deepcopy(architecture)
    if patch_size is not None:
        cfg["patch_size"] = [int(p) for p in patch_size]
    cfg["data_identifier"] = f"{plans_name.removesuffix('_scratch')}_3d_fullres"
    cfg["batch_size"] = int(options.pop("batch_size", 2))
    cfg["ssl3d_finetune"] = options
    cfg["batch_dice"] = True
    return plans
