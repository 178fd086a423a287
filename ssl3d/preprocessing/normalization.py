"""Per-channel intensity normalization as planned.

nnU-Net's schemes (CTNormalization, ZScoreNormalization, ...) are used as they are; ssl3d adds a fixed CT
window mapped to [0, 1] (HySparK's -175..250 HU preprocessing) that nnU-Net does not ship.
"""
from __future__ import annotations

import numpy as np

from nnunetv2.preprocessing.normalization import default_normalization_schemes as nnunet_schemes


def window_to_unit(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to [lo, hi] and map linearly to [0, 1]."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"CT window must have hi > lo, got {window}")
    out = image.astype(np.float32, copy=False)
    np.clip(out, lo, hi, out=out)
    out -= lo
    out /= hi - lo
    return out


def normalize_channels(data: np.ndarray, seg: np.ndarray | None, configuration: dict,
                       foreground_props: dict) -> np.ndarray:
    """Normalize a (C, Z, Y, X) float32 array in place following a plans configuration."""
    schemes = configuration["normalization_schemes"]
    use_mask = configuration["use_mask_for_norm"]
    extra = configuration.get("ssl3d", {}).get("normalization_kwargs", [{}] * len(schemes))
    for c, scheme in enumerate(schemes):
        if scheme == "CTWindowNormalization":
            data[c] = window_to_unit(data[c], extra[c]["window"])
            continue
        cls = getattr(nnunet_schemes, scheme, None)
        if cls is None:
            raise ValueError(f"unknown normalization scheme '{scheme}' in plans")
        normalizer = cls(use_mask_for_norm=use_mask[c], intensityproperties=foreground_props[str(c)])
        data[c] = normalizer.run(data[c], None if seg is None else seg[0])
    return data
