"""The plan in a few lines: what ``ssl_plan_and_preprocess`` decided and why, for the user to check before
spending GPU days on it (a CT atlas whose background was set to 0 is taken for MRI, for example)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ssl3d.planning.fingerprint import modality_rule


def _axes(v: Sequence) -> str:
    return " x ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)


def modality_rules(fingerprint: dict, override: str | None) -> dict[str, str]:
    """Per channel: the rule that decided its modality (also stored in the plans)."""
    names = fingerprint["channel_names"]
    out = {}
    for c, modality in fingerprint["modalities"].items():
        votes = [case["channels"][int(c)]["modality"] for case in fingerprint.get("cases", {}).values()]
        out[c] = modality_rule(modality, str(names.get(c, "")), override, votes)
    return out


def plan_summary(plans: dict, fingerprint: dict, override: str | None = None,
                 spacing_given: bool = False) -> list[str]:
    """Lines naming every decision: modality per channel and its rule, normalization, spacing, patch, network
    stages, mask cell. Axes are in the plans' (transposed) order, as nnU-Net stores them."""
    cfg = plans["configurations"]["3d_fullres"]
    ssl = cfg["ssl3d"]
    rules = plans.get("ssl3d", {}).get("modality_rules") or modality_rules(fingerprint, override)
    lines = []
    for c, modality in sorted(fingerprint["modalities"].items(), key=lambda kv: int(kv[0])):
        name = fingerprint["channel_names"].get(c, "")
        scheme = cfg["normalization_schemes"][int(c)]
        kw = ssl.get("normalization_kwargs", [{}] * (int(c) + 1))[int(c)] or {}
        norm = scheme + (f" window {kw['window']}" if "window" in kw else "") + \
            (" inside the nonzero mask" if cfg["use_mask_for_norm"][int(c)] else "")
        lines.append(f"channel {c} ({name}): {modality} [{rules[c]}]; normalization {norm}")
    median = plans.get("original_median_spacing_after_transp")
    if spacing_given:
        why = "--spacing"
    elif median is not None and np.allclose(median, cfg["spacing"]):
        why = "nnU-Net's rule: per-axis median"
    else:
        why = f"nnU-Net's rule: the anisotropic axis takes its 10th percentile (median {_axes(median or [])})"
    lines.append(f"spacing {_axes(cfg['spacing'])} mm [{why}]; median shape after resampling "
                 f"{_axes([int(round(v)) for v in cfg['median_image_size_in_voxels']])}")
    patch = cfg["patch_size"]
    lines.append(f"patch {_axes(patch)} ({int(np.prod(patch)):,} voxels, budget {ssl['patch_voxel_budget']:,})")
    a = cfg["architecture"]["arch_kwargs"]
    net = cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    strides = ", ".join("x".join(map(str, s)) for s in a["strides"])
    lines.append(f"network {net}: {a['n_stages']} stages, features {a['features_per_stage']}, strides {strides} "
                 f"(planned size; ssl_pretrain --size picks another)")
    lines.append(f"mask cell {_axes(ssl['mask_cell_size'])} (total stride {_axes(ssl['total_stride'])}), ratio "
                 f"{ssl['mask_ratio']:g}, grid {_axes(ssl['mask_grid'])}")
    return lines
