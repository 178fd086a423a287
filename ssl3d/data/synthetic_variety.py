"""Per-case anatomical and scanner variety of the synthetic CT phantoms (:mod:`ssl3d.data.synthetic`).

Every quantity a case varies is drawn here, from a range in :data:`VARIATION` that docs/synthetic_data.md
states with the anatomy or scanner facts behind it. The draws come from the case's own generator in a fixed
order that does not depend on the contrast phase or on a liver HU shift, so one seed gives one anatomy in
every variant of a dataset.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# name -> (low, high), both inclusive; units in the name. docs/synthetic_data.md explains each range.
VARIATION: dict[str, tuple[float, float]] = {
    "adiposity": (0.0, 1.0),  # drives body size, subcutaneous fat and (through size) noise together
    "body_half_width_mm": (125.0, 190.0),
    "body_anterior_mm": (80.0, 140.0),
    "body_posterior_mm": (80.0, 115.0),
    "body_squareness": (2.0, 2.8),  # superellipse exponent of the cross-section: 2 oval, higher boxier
    "fat_lateral_mm": (5.0, 35.0),
    "fat_anterior_mm": (5.0, 40.0),
    "fat_posterior_mm": (5.0, 20.0),
    "fov_fill": (0.72, 0.97),  # share of the in-plane field of view the body spans
    "respiratory_shift_mm": (-10.0, 10.0),  # breath-hold level: upper-abdominal organs move along z
    "deformation_mm": (3.0, 10.0),
    "deformation_scale_mm": (50.0, 90.0),
    "z_coverage_mm": (160.0, 300.0),
    "slice_profile_ratio": (1.0, 1.5),  # reconstructed slice thickness / slice spacing
    "noise_sigma_hu": (8.0, 30.0),
    "noise_grain_vox": (0.3, 1.2),  # in-plane correlation of the noise: soft (large) to sharp (small) kernel
    "noise_lowfreq": (0.0, 0.4),  # share of blotchy low-frequency noise (iterative reconstruction)
    "contrast_timing": (0.0, 1.0),  # position within the portal-venous window, early (0) to late (1)
    "contrast_dose": (0.0, 1.0),  # dose / cardiac output: stronger (1) or weaker (0) enhancement
    "lesion_count": (0, 3),
    "lesion_diameter_mm": (5.0, 30.0),
}
LESION_PROBABILITY = 0.3  # share of cases with focal liver lesions
CYST_SHARE = 0.6  # of the lesions: simple cysts (the rest: solid hypodense lesions)
CYST_HU = (0.0, 20.0)
SOLID_DARKER_HU = (20.0, 50.0)  # solid lesion below the normal parenchyma

# portal-venous values (published ranges) and whether they rise or fall from early to late in the window
VENOUS_HU: dict[str, tuple[float, float, bool]] = {
    "liver": (100, 120, True), "spleen": (110, 130, False), "kidney_cortex": (150, 200, False),
    "kidney_medulla": (90, 130, True), "aorta": (150, 250, False), "ivc": (120, 180, True), "bowel": (30, 60, True),
}


def _rng_in(rng: np.random.Generator, name: str) -> float:
    return float(rng.uniform(*VARIATION[name]))


def sample_variation(rng: np.random.Generator) -> dict[str, Any]:
    """Body habitus, organ position, field of view, scanner and contrast parameters of one case."""
    u = rng.uniform
    fat = _rng_in(rng, "adiposity")
    v: dict[str, Any] = {"adiposity": fat}
    # larger patients are wider and deeper mostly through fat; the lean range is an adult's 250-300 mm width
    v["body_half_width_mm"] = float(u(125, 150) + 40 * fat)
    v["body_anterior_mm"] = float(u(80, 105) + 35 * fat)
    v["body_posterior_mm"] = float(u(80, 100) + 15 * fat)
    v["body_squareness"] = _rng_in(rng, "body_squareness")
    v["fat_lateral_mm"] = float(5 + 30 * fat * u(0.6, 1.0))
    v["fat_anterior_mm"] = float(5 + 35 * fat * u(0.6, 1.0))
    v["fat_posterior_mm"] = float(5 + 15 * fat * u(0.6, 1.0))
    for name in ("fov_fill", "respiratory_shift_mm", "deformation_mm", "deformation_scale_mm",
                 "slice_profile_ratio", "noise_grain_vox", "noise_lowfreq", "contrast_timing", "contrast_dose"):
        v[name] = _rng_in(rng, name)
    # fixed tube current: noise grows with the patient's width (automatic exposure control evens out part of it)
    lo, hi = VARIATION["noise_sigma_hu"]
    v["noise_sigma_hu"] = float(np.clip(u(9, 22) * (2 * v["body_half_width_mm"] / 300.0) ** 1.2, lo, hi))
    v["z_coverage_mm"] = _rng_in(rng, "z_coverage_mm")
    return v


def venous_hu(rng: np.random.Generator, timing: float, dose: float) -> dict[str, float]:
    """Portal-venous tissue values: each organ's place in its published range follows the timing (rising or
    falling through the window) and the dose, plus a little individual scatter."""
    out = {}
    for organ, (lo, hi, rising) in VENOUS_HU.items():
        w = timing if rising else 1.0 - timing
        out[organ] = float(lo + (hi - lo) * np.clip(0.7 * w + 0.3 * dose + rng.normal(0, 0.1), 0.0, 1.0))
    return out


def sample_lesions(rng: np.random.Generator, n_candidates: int, normal_liver_hu: float) -> list[dict[str, Any]]:
    """Focal liver lesions of one case: which candidate liver voxel is each centre, diameter, HU.

    Solid lesions are darker than the *normal* parenchyma, so steatosis (a lower liver value) does not change
    them. Always draws the same number of values, so later draws do not depend on the count.
    """
    has = rng.random() < LESION_PROBABILITY
    count = int(rng.integers(1, VARIATION["lesion_count"][1] + 1))
    lesions = []
    for i in range(VARIATION["lesion_count"][1]):
        pick, diameter = int(rng.integers(0, max(n_candidates, 1))), _rng_in(rng, "lesion_diameter_mm")
        cyst = bool(rng.random() < CYST_SHARE)
        hu = float(rng.uniform(*CYST_HU)) if cyst else float(normal_liver_hu - rng.uniform(*SOLID_DARKER_HU))
        if has and i < count and n_candidates > 0:
            lesions.append({"voxel": pick, "diameter_mm": diameter, "kind": "cyst" if cyst else "solid", "hu": hu})
    return lesions


def lesion_mask(a: np.ndarray, b: np.ndarray, z: np.ndarray, liver: np.ndarray,
                lesions: list[dict[str, Any]]) -> list[tuple[np.ndarray, float]]:
    """(mask, HU) per lesion: a ball in the anatomy's (warped) millimetres around its centre voxel, kept inside
    the liver."""
    idx = np.flatnonzero(liver)
    out = []
    for les in lesions:
        c = np.unravel_index(idx[les["voxel"]], liver.shape)
        ca, cb, cz = (float(np.broadcast_to(g, liver.shape)[c]) for g in (a, b, z))
        r = 0.5 * les["diameter_mm"]
        out.append((liver & ((a - ca) ** 2 + (b - cb) ** 2 + (z - cz) ** 2 < r * r), les["hu"]))
    return out
