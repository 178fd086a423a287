"""Synthetic abdomen-like CT phantoms, written as nnU-Net v2 raw datasets for demos and tests.

The anatomy is an analytic model in *reference* millimetres (an adult abdomen of roughly 300 x 220 mm
in-plane; ``a`` runs to the patient's left, ``b`` posterior, ``z`` caudal from the liver dome). Each case
draws spacing and grid size, scales the reference body into that field of view (small grids hold a
smaller body), samples the anatomy through a smooth random displacement field so cases differ, then adds
texture, blur and noise. Image and label come from the same warped coordinates, so they always agree.
The canonical array is LPS (ITK identity direction); random flips and an in-plane axis swap then give
each case its own direction matrix and origin, with the slice axis always kept as the array's first axis.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from ssl3d.data.synthetic_variety import lesion_mask, sample_lesions, sample_variation, venous_hu
from ssl3d.utils import BadInputError, write_json

logger = logging.getLogger(__name__)

LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4,
                          "aorta": 5, "inferior_vena_cava": 6, "vertebrae": 7}
# (in-plane voxels, slices) per preset; both inclusive.
SIZE_PRESETS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "tiny": ((40, 56), (12, 24)),
    "small": ((80, 128), (24, 64)),
}
INPLANE_SPACING_MM = (0.6, 1.8)
SLICE_SPACING_MM = (1.5, 5.0)
HU_MIN, HU_MAX = -1024, 3071  # the usual 12-bit CT range
FILE_ENDING = ".nii.gz"
_ANATOMY_Z = (-5.0, 300.0)  # reference z covered by the model: liver dome to below the aortic bifurcation
_ALL_ORGANS_Z = (95.0, 125.0)  # every labeled structure is present at these levels; each scan includes them


@dataclass
class Phantom:
    """One synthetic CT case. Arrays are (z, y, x); geometry is in SimpleITK (x, y, z) order."""

    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8, ids as in LABELS
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 floats, row-major, orthonormal
    info: dict[str, Any] = field(default_factory=dict)  # sampled parameters, for debugging and tests


def _axis_kernel(x: np.ndarray, feature: float) -> np.ndarray:
    """Gaussian weights from lattice nodes to sample positions, each row of unit L2 norm (unit variance)."""
    step = 0.7 * feature
    nodes = np.arange(x.min() - 2 * feature, x.max() + 2 * feature + step, step)
    w = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / feature) ** 2)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _smooth_field(rng: np.random.Generator, axes: tuple[np.ndarray, np.ndarray, np.ndarray],
                  feature: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field on the grid spanned by three 1-D coordinate axes.

    A separable Gaussian kernel over a random lattice: three small matrix products instead of a
    large 3-D convolution, and exactly stationary in variance up to the grid edges. Computed in float64
    so BLAS summation order cannot change the float32 result that thresholds see.
    """
    mz, my, mx = (_axis_kernel(x.astype(np.float64), feature) for x in axes)
    w = rng.standard_normal((mz.shape[1], my.shape[1], mx.shape[1]))
    t = np.tensordot(mz, w, axes=(1, 0))  # (nz, cy, cx)
    t = np.tensordot(t, my, axes=(1, 1))  # (nz, cx, ny)
    t = np.tensordot(t, mx, axes=(1, 1))  # (nz, ny, nx)
    return np.ascontiguousarray(t, dtype=np.float32)


def _superellipse(a: np.ndarray, b: np.ndarray, half_w: Any, ant: Any, post: Any, p: float) -> np.ndarray:
    """Normalised radius of a body-like cross-section (< 1 inside); deeper anteriorly than posteriorly."""
    depth = np.where(b < 0, ant, post)
    return (np.abs(a / half_w) ** p + np.abs(b / depth) ** p) ** (1.0 / p)


def _ellipsoid(a: np.ndarray, b: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
               semi: tuple[float, float, float], angle: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipsoid rotated by ``angle`` (rad) in the axial plane."""
    da, db = a - centre[0], b - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * da + s * db, -s * da + c * db
    return (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2


def _segment_dist2(a: np.ndarray, b: np.ndarray, z: np.ndarray, p0: tuple[float, float],
                   p1: tuple[float, float], z0: float) -> np.ndarray:
    """Squared distance to an axial line segment p0-p1 at level z0 (for vessels running in-plane)."""
    da, db = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((a - p0[0]) * da + (b - p0[1]) * db) / max(da * da + db * db, 1e-6), 0, 1)
    return (a - p0[0] - t * da) ** 2 + (b - p0[1] - t * db) ** 2 + (z - z0) ** 2


PHASES = ("native", "portal-venous")


def _sample_hu(rng: np.random.Generator, phase: str, var: dict[str, Any]) -> dict[str, float]:
    """Per-case tissue values (HU) within published ranges; vessels and renal cortex contrast-enhanced.

    ``portal-venous`` (most public abdominal CT, e.g. BTCV): enhancing parenchyma, liver 100-120, spleen
    110-130, renal cortex 150-200, aorta 150-250, each placed in its range by the case's contrast timing and dose.
    """
    u = rng.uniform
    hu = {"fat": u(-110, -85), "muscle": u(40, 60), "liver": u(55, 65), "spleen": u(45, 50),
          "kidney_medulla": u(30, 40), "kidney_cortex": u(120, 170), "aorta": u(170, 250), "ivc": u(140, 200),
          "cortical": u(700, 1000), "cancellous": u(200, 300), "disc": u(70, 100), "csf": u(0, 15),
          "rib": u(350, 650), "bowel": u(20, 45), "fluid": u(0, 20), "gas": u(-900, -750)}
    # drawn in both phases so that a seed's anatomy, noise and geometry do not depend on the phase
    venous = venous_hu(rng, var["contrast_timing"], var["contrast_dose"])
    if phase == "portal-venous":
        hu.update(venous)
    elif phase != "native":
        raise ValueError(f"unknown contrast phase {phase!r}; choose from {', '.join(PHASES)}")
    return hu


def _render(rng: np.random.Generator, za: np.ndarray, ba: np.ndarray, aa: np.ndarray, body: dict[str, float],
            vox: tuple[float, float, float], var: dict[str, Any], phase: str = "native",
            liver_hu_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Paint the anatomy on the grid spanned by reference-mm axes (z, b, a); later structures win."""
    u = rng.uniform
    hu_of = _sample_hu(rng, phase, var)
    normal_liver = hu_of["liver"]
    hu_of["liver"] += liver_hu_shift  # e.g. steatosis (negative); no draw, so the anatomy stays the seed's
    resp = var["respiratory_shift_mm"]  # breath-hold level moves the upper-abdominal organs together
    axes = (za, ba, aa)
    shape = (za.size, ba.size, aa.size)
    thin = max(2.5, 1.3 * vox[1])  # thin bone must stay at least a voxel thick to survive sampling

    # pull-back deformation: anatomy is evaluated at displaced positions, same for image and label
    amp, feat = var["deformation_mm"], var["deformation_scale_mm"]
    a = aa[None, None, :] + amp * _smooth_field(rng, axes, feat)
    b = ba[None, :, None] + amp * _smooth_field(rng, axes, feat)
    z = za[:, None, None] + 0.5 * amp * _smooth_field(rng, axes, feat)

    hu = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)

    def paint(mask: np.ndarray, value: float, label: int = 0) -> None:
        # every stroke sets the label too, so whatever shows in the image is what the label says
        hu[mask] = value
        lab[mask] = label

    def jitter(sd: float = 8.0) -> float:
        return float(rng.normal(0, sd))

    def grow() -> float:
        return u(0.85, 1.15)

    def organ(centre: tuple[float, ...], semi: tuple[float, ...], angle: float, sd: float = 8.0) -> np.ndarray:
        c = (centre[0] + jitter(sd), centre[1] + jitter(sd), centre[2] + jitter(sd))
        return _ellipsoid(a, b, z, c, (semi[0] * grow(), semi[1] * grow(), semi[2] * grow()), angle) < 1

    # body outline, subcutaneous fat, muscle wall, visceral cavity; the outline breathes along z
    wave = np.sin(2 * np.pi * z / body["z_period"] + body["z_phase"])
    half_w = body["half_w"] * (1 + body["z_amp"] * wave)
    ant, post = body["ant"] * (1 + 0.7 * body["z_amp"] * wave), body["post"]
    p = body["p"]
    tf_lat, tf_ant, tf_post = var["fat_lateral_mm"], var["fat_anterior_mm"], var["fat_posterior_mm"]
    tm = u(7, 14)
    body_mask = _superellipse(a, b, half_w, ant, post, p) < 1
    paint(body_mask, hu_of["fat"])
    muscle_in = _superellipse(a, b, half_w - tf_lat, ant - tf_ant, post - tf_post, p) < 1
    paint(muscle_in, hu_of["muscle"])
    cav = _superellipse(a, b, half_w - tf_lat - tm, ant - tf_ant - tm, post - tf_post - tm, p) < 1
    paint(cav, hu_of["fat"] + u(0, 10))

    # ribs: oblique bands in the wall above rib_end, sparing the anterior midline more and more caudally
    rib_end, period = u(110, 140), u(24, 32)
    wall = muscle_in & ~cav
    theta = np.arctan2(b, a)
    spare = 0.5 + 1.5 * np.clip(z / rib_end, 0, 1)
    ribs = wall & (z < rib_end) & (np.abs(theta + np.pi / 2) > spare)
    ribs &= np.mod(z + 35 * theta, period) < max(9.0, 0.6 * vox[0])
    paint(ribs, hu_of["rib"])

    # bowel: worm-like loops (band around the zero set of a smooth field), gas rising anteriorly
    zone = _smooth_field(rng, axes, 70.0) + 0.6 * (z - 150) / 100 - 0.4 * b / 100 > u(-1.2, -0.5)
    loops = _smooth_field(rng, axes, u(12, 20))
    bowel = cav & zone
    paint(bowel & (loops > -0.6), hu_of["bowel"])  # the rest of the zone stays mesenteric fat
    lumen = bowel & (loops >= 0.2)
    paint(lumen, hu_of["fluid"] + 10)
    gas = lumen & (_smooth_field(rng, axes, 15.0) - 0.4 * b / 100 > u(0.8, 1.2))
    paint(gas, hu_of["gas"])

    # stomach with an air-fluid level (supine: gas anterior), liver, gallbladder, spleen
    st_c, st_s = (45 + jitter(), -40 + jitter(), 70 + resp + jitter()), (35 * grow(), 30 * grow(), 45 * grow())
    stomach = cav & (_ellipsoid(a, b, z, st_c, st_s, u(-0.4, 0.4)) < 1)
    paint(stomach, hu_of["fluid"])
    paint(stomach & (b < st_c[1] - u(0.3, 0.7) * st_s[1]), hu_of["gas"])
    liver = organ((-55, -5, 75 + resp), (72, 75, 80), u(-0.2, 0.2)) | organ((5, -45, 60 + resp), (45, 28, 45),
                                                                           u(-0.3, 0.3))
    paint(cav & liver, hu_of["liver"], LABELS["liver"])
    # focal lesions (cysts, solid hypodense) stay inside the liver and keep its label, as in liver masks that
    # include tumours; drawn whatever the phase or shift, so the rest of the case does not change with them
    lesions = sample_lesions(rng, int((cav & liver).sum()), normal_liver)
    for mask, value in lesion_mask(a, b, z, cav & liver, lesions):
        paint(mask, value, LABELS["liver"])
    paint(cav & organ((-35, -45, 112 + resp), (13, 13, 28), u(-1, 1), sd=4), hu_of["fluid"])  # gallbladder
    spleen = cav & organ((85, 40, 75 + resp), (22, 50, 50), u(-0.9, -0.5))
    paint(spleen, hu_of["spleen"], LABELS["spleen"])

    # spine geometry first: kidneys, vessels and muscles are placed relative to it
    spine_b = body["post"] - tf_post - u(58, 66)
    rva = u(18, 24)
    rvb = 0.8 * rva
    rc = u(7, 9)
    canal_b = spine_b + rvb + 2 + rc

    # kidneys: contrast-enhanced cortex, medulla, fat-filled sinus at the medial hilum
    hilums: dict[str, tuple[float, float, float]] = {}
    for side, name, zc in ((1, "kidney_left", 135.0), (-1, "kidney_right", 150.0)):
        zc += 0.6 * resp + jitter(6)  # kidneys move less with breathing than liver and spleen
        centre = (side * (rva + u(40, 50)), spine_b + jitter(4), zc)
        semi = (27 * grow(), 22 * grow(), 55 * grow())
        ang = side * u(0.4, 0.8)  # hilum faces anteromedially
        kidney = cav & (_ellipsoid(a, b, z, centre, semi, ang) < 1)
        rim = max(5.0, 1.2 * vox[1])
        inner = _ellipsoid(a, b, z, centre, tuple(max(1.0, s - rim) for s in semi), ang) < 1
        paint(kidney, hu_of["kidney_cortex"], LABELS[name])
        paint(kidney & inner, hu_of["kidney_medulla"], LABELS[name])
        hilum = (centre[0] - side * 0.8 * semi[0], centre[1] - 0.3 * semi[1], zc)
        hilums[name] = hilum
        paint(kidney & (_ellipsoid(a, b, z, hilum, (10, 8, 18)) < 1), hu_of["fat"])

    # muscles beside and behind the spine: psoas grows caudally, paraspinals throughout
    z_ps = u(140, 170)
    r_ps = np.maximum(np.clip((z - z_ps) * 0.25, 0, 22), 1e-3)
    for side in (1, -1):
        paint((((a - side * (rva + 0.9 * r_ps)) / r_ps) ** 2 + ((b - spine_b + 2) / (0.9 * r_ps)) ** 2 < 1)
              & (z > z_ps), hu_of["muscle"])
        paint(_ellipsoid(a, b, z, (side * (rc + 18), canal_b + 14, 0), (20, 16, np.inf)) < 1, hu_of["muscle"])

    # vessels: aorta left-anterior of the spine, bifurcating caudally; IVC right; renal veins to the IVC
    r_ao = u(9, 13)
    ao_a, ao_b = 0.6 * rva + jitter(3), spine_b - rvb - r_ao - 3
    ivc_a, ivc_b, ivc_s = -(0.5 * rva + 14) + jitter(3), spine_b - rvb - 10, (u(11, 14), u(7, 10))
    r_rv = max(4.0, 0.8 * vox[1])
    for name, (ha, hb, hz) in hilums.items():
        # the left renal vein crosses in front of the aorta on its way to the IVC
        route = [(ha, hb), (ao_a, ao_b - r_ao - r_rv - 1), (ivc_a, ivc_b)] if name == "kidney_left" \
            else [(ha, hb), (ivc_a, ivc_b)]
        for p0, p1 in zip(route[:-1], route[1:]):
            paint(_segment_dist2(a, b, z, p0, p1, hz) < r_rv ** 2, hu_of["ivc"])
    paint(((a - ivc_a) / ivc_s[0]) ** 2 + ((b - ivc_b) / ivc_s[1]) ** 2 < 1, hu_of["ivc"],
          LABELS["inferior_vena_cava"])
    z_bif = u(230, 260)
    paint(((a - ao_a) ** 2 + (b - ao_b) ** 2 < r_ao ** 2) & (z < z_bif), hu_of["aorta"], LABELS["aorta"])
    for side in (1, -1):
        off = ao_a + side * 0.35 * np.maximum(z - z_bif, 0)
        paint(((a - off) ** 2 + (b - ao_b) ** 2 < (0.65 * r_ao) ** 2) & (z >= z_bif), hu_of["aorta"])

    # spine: vertebral bodies (cortical shell, cancellous core) separated by discs; arch and processes
    v_period, phase = u(30, 36), u(0, 36)
    level = np.mod(z + phase, v_period)
    disc = level < 0.2 * v_period
    vb_r2 = (a / rva) ** 2 + ((b - spine_b) / rvb) ** 2
    core_r2 = (a / max(1.0, rva - thin)) ** 2 + ((b - spine_b) / max(1.0, rvb - thin)) ** 2
    canal_r = np.sqrt(a ** 2 + (b - canal_b) ** 2)
    arch = (canal_r < rc + thin) & (b > canal_b - 0.5 * rc) & ~disc
    spinous = (np.abs(a) < max(3.0, 0.6 * vox[1])) & (b > canal_b) & (b < canal_b + rc + 28) & ~disc
    transverse = (np.abs(np.abs(a) - (rc + 14)) < 14) & (np.abs(b - canal_b + 2) < max(3.0, 0.6 * vox[1]))
    transverse &= (level > 0.35 * v_period) & (level < 0.7 * v_period)
    bone = ((vb_r2 < 1) & ~disc) | arch | spinous | transverse
    paint((vb_r2 < 1) & disc, hu_of["disc"])
    paint(bone, hu_of["cortical"], LABELS["vertebrae"])
    paint((core_r2 < 1) & ~disc, hu_of["cancellous"], LABELS["vertebrae"])
    paint(canal_r < rc, hu_of["csf"])

    # parenchymal texture inside the body, then scanner blur and (slightly correlated) noise
    # Air and gas edges stay sharp: at 50-100 voxels across, blurred skin and gas borders would fill a
    # share of the body with -900..-100 HU partial-volume voxels far above a 512^2 scan's and skew the
    # foreground statistics that planning reads. Blur only tissue, with air/gas filled by their neighbours.
    air, gas = ~body_mask, body_mask & (hu < -500)
    hu[air], hu[gas] = hu_of["fat"], hu_of["fluid"]
    hu += u(3, 7) * _smooth_field(rng, axes, u(8, 15))
    # slice sensitivity profile: a Gaussian of FWHM = reconstructed thickness (ratio x spacing) along z
    hu = ndimage.gaussian_filter(hu, sigma=(var["slice_profile_ratio"] / 2.355, u(0.4, 0.8), u(0.4, 0.8)))
    hu[air], hu[gas] = -1000.0, hu_of["gas"]
    # noise texture: the kernel sets the grain; iterative reconstruction adds low-frequency blotches
    grain = var["noise_grain_vox"]
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.3 * grain, grain, grain))
    noise /= max(float(noise.std()), 1e-6)
    blotch = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(1.0, 2.5, 2.5))
    blotch /= max(float(blotch.std()), 1e-6)
    f = var["noise_lowfreq"]
    sigma = var["noise_sigma_hu"]
    hu += sigma * (np.sqrt(1 - f) * noise + np.sqrt(f) * blotch)
    hu_of["noise_sigma"] = sigma
    var["lesions"] = lesions
    image = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    return image, lab, hu_of


def _reorient(rng: np.random.Generator, arrays: list[np.ndarray], spacing: tuple[float, float, float],
              origin: tuple[float, float, float]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Random in-plane axis swap and axis flips, with spacing/origin/direction that keep every voxel's
    physical position. Inputs are canonical (identity direction); geometry is in SimpleITK (x, y, z) order."""
    swap = bool(rng.random() < 0.25)
    flips = rng.random(3) < 0.5  # per SimpleITK axis x, y, z
    perm = (1, 0, 2) if swap else (0, 1, 2)  # new SimpleITK axis j runs along canonical axis perm[j]
    if swap:
        arrays = [np.swapaxes(x, 1, 2) for x in arrays]
    size = arrays[0].shape[::-1]
    for j in range(3):
        if flips[j]:
            arrays = [np.flip(x, axis=2 - j) for x in arrays]
    direction = np.zeros((3, 3))
    new_origin = np.asarray(origin, float).copy()
    for j in range(3):
        axis = perm[j]
        direction[axis, j] = -1.0 if flips[j] else 1.0
        if flips[j]:
            new_origin[axis] += spacing[axis] * (size[j] - 1)
    geometry = {"spacing": tuple(float(spacing[perm[j]]) for j in range(3)),
                "origin": tuple(float(v) for v in new_origin),
                "direction": tuple(float(v) for v in direction.ravel()),
                "swap_xy": swap, "flips_xyz": tuple(bool(f) for f in flips)}
    return [np.ascontiguousarray(x) for x in arrays], geometry


def make_phantom(rng: np.random.Generator, size: str = "small", phase: str = "native",
                 liver_hu_shift: float = 0.0) -> Phantom:
    """Draw one synthetic abdominal CT (image in int16 HU, organ labels in uint8); ``liver_hu_shift`` is added
    to the liver's tissue value (fatty liver: negative)."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZE_PRESETS)}")
    (lo, hi), (zlo, zhi) = SIZE_PRESETS[size]
    u = rng.uniform
    s_xy = u(*INPLANE_SPACING_MM)
    s_z = u(max(SLICE_SPACING_MM[0], s_xy), SLICE_SPACING_MM[1])  # slices never finer than in-plane
    n_lr = int(rng.integers((lo + hi) // 2, hi + 1))
    n_ap = int(rng.integers(max(lo, int(0.75 * n_lr)), n_lr + 1))
    n_z = int(rng.integers(zlo, zhi + 1))

    var = sample_variation(rng)
    body = {"half_w": var["body_half_width_mm"], "ant": var["body_anterior_mm"], "post": var["body_posterior_mm"],
            "p": var["body_squareness"], "z_amp": u(0.02, 0.07), "z_period": u(150, 400), "z_phase": u(0, 2 * np.pi)}
    # largest reference body that fits the field of view with a margin for the z wave and the deformation
    reach_lr = 2 * (body["half_w"] * (1 + body["z_amp"]) + 10)
    reach_ap = body["ant"] * (1 + body["z_amp"]) + body["post"] + 20
    fill = var["fov_fill"]
    scale = min(1.0, fill * n_lr * s_xy / reach_lr, fill * n_ap * s_xy / reach_ap)
    # z: same scale where the slab fits the modelled anatomy, else stretched to cover 160-300 mm of it
    length = min(n_z * s_z / scale, var["z_coverage_mm"], _ANATOMY_Z[1] - _ANATOMY_Z[0])
    z_lo = max(_ANATOMY_Z[0], _ALL_ORGANS_Z[1] - length)
    z_hi = max(z_lo, min(_ALL_ORGANS_Z[0], _ANATOMY_Z[1] - length))
    z0 = u(z_lo, z_hi)
    dz = length / n_z
    dxy = s_xy / scale
    # canonical array axes (S, P, L); index 0 along S is the most caudal slice
    za = (z0 + (n_z - 1 - np.arange(n_z)) * dz + 0.5 * dz).astype(np.float32)
    b_mid = 0.5 * (body["post"] - body["ant"]) + rng.normal(0, 3)
    ba = (b_mid + (np.arange(n_ap) - 0.5 * (n_ap - 1)) * dxy).astype(np.float32)
    aa = (rng.normal(0, 4) + (np.arange(n_lr) - 0.5 * (n_lr - 1)) * dxy).astype(np.float32)

    image, label, hu = _render(rng, za, ba, aa, body, (dz, dxy, dxy), var, phase, liver_hu_shift)

    spacing = (s_xy, s_xy, s_z)
    extent = np.array([n_lr, n_ap, n_z]) * np.array(spacing)
    origin = tuple(-0.5 * extent + np.array([u(-30, 30), u(-30, 30), u(-400, 100)]))
    (image, label), geometry = _reorient(rng, [image, label], spacing, origin)
    info = {"size": size, "phase": phase, "scale_inplane": scale, "scale_z": n_z * s_z / length, "z_window_mm": (z0, z0 + length),
            "hu": hu, "variation": var, "swap_xy": geometry["swap_xy"], "flips_xyz": geometry["flips_xyz"]}
    return Phantom(image=image, label=label, spacing=geometry["spacing"], origin=geometry["origin"],
                   direction=geometry["direction"], info=info)


def phantom_to_sitk(p: Phantom) -> tuple[sitk.Image, sitk.Image]:
    """The phantom's image (Int16) and label (UInt8) as SimpleITK images sharing one geometry."""
    out = []
    for arr in (p.image, p.label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(v) for v in p.spacing))
        img.SetOrigin(tuple(float(v) for v in p.origin))
        img.SetDirection(tuple(float(v) for v in p.direction))
        out.append(img)
    return out[0], out[1]


def _write_image_atomic(img: sitk.Image, path: Path) -> None:
    # the temporary name keeps the .nii.gz ending because SimpleITK picks the writer from it
    tmp = path.with_name(f".tmp_{path.name}")
    try:
        sitk.WriteImage(img, str(tmp), useCompression=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _case_rng(seed: int, subset: int, index: int) -> np.random.Generator:
    """Independent stream per (seed, subset, case): growing a dataset never changes its earlier cases."""
    return np.random.default_rng(np.random.SeedSequence([seed, subset, index]))


def _files_to_drop(folder: Path, raw_dir: Path, dataset_id: int, case_pattern: str,
                   expected: set[str]) -> list[Path]:
    """Stale cases and leftovers of an interrupted run; raises on id clashes and files that are not ours."""
    others = [d.name for d in raw_dir.glob(f"Dataset{dataset_id:03d}_*") if d.is_dir() and d != folder]
    if others:
        raise BadInputError(raw_dir / others[0], f"dataset id {dataset_id} is already used there; nnU-Net "
                            "needs unique ids, so choose another id or remove that folder")
    drop = [folder / "dataset.json"]  # written again last: its presence marks a complete dataset
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
            if f.name.startswith(".tmp_") or (re.fullmatch(case_pattern, f.name) and f.name not in expected):
                drop.append(f)
            elif not re.fullmatch(case_pattern, f.name):
                raise BadInputError(f, "was not written by ssl_make_demo_data; refusing to mix it into the "
                                    "synthetic dataset (move it away or pick another dataset id/name)")
    return drop


def write_demo_datasets(raw_dir: str | os.PathLike, seed: int = 0, n_unlabeled: int = 16, n_labeled: int = 8,
                        size: str = "small", unlabeled_id: int = 801, labeled_id: int = 802,
                        unlabeled_name: str = "SynthCTPool", labeled_name: str = "SynthCTOrgans",
                        progress: bool = True, phase: str = "native") -> dict[str, Path]:
    """Write an unlabeled pool and a labeled organ set of synthetic CT in nnU-Net v2 raw format.

    Returns ``{"unlabeled": folder, "labeled": folder}``; a subset with zero cases is not written and its
    key is absent. Output is byte-identical for the same seed; files are replaced atomically and each
    ``dataset.json`` is written after all of its cases.
    """
    if size not in SIZE_PRESETS:
        raise BadInputError(None, f"unknown size {size!r}; choose from {', '.join(sorted(SIZE_PRESETS))}")
    if phase not in PHASES:
        raise BadInputError(None, f"unknown contrast phase {phase!r}; choose from {', '.join(PHASES)}")
    if seed < 0 or n_unlabeled < 0 or n_labeled < 0:
        raise BadInputError(None, "seed and case counts must be >= 0")
    if n_unlabeled and n_labeled and unlabeled_id == labeled_id:
        raise BadInputError(None, f"the unlabeled and labeled datasets need different ids (both {labeled_id})")
    for dataset_id, name in ((unlabeled_id, unlabeled_name), (labeled_id, labeled_name)):
        if not 1 <= dataset_id <= 999:
            raise BadInputError(None, f"dataset id {dataset_id} is outside nnU-Net's range 1-999")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise BadInputError(None, f"dataset name {name!r} may only hold letters, digits, '_' and '-'")

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    subsets = [(0, "unlabeled", unlabeled_id, unlabeled_name, n_unlabeled, "pool"),
               (1, "labeled", labeled_id, labeled_name, n_labeled, "organs")]
    jobs, folders, drop = [], {}, []
    for subset, key, dataset_id, name, n, prefix in subsets:
        if n == 0:
            continue
        folder = raw_dir / f"Dataset{dataset_id:03d}_{name}"
        cases = [f"{prefix}_{i:04d}" for i in range(n)]
        expected = {f"{c}_0000{FILE_ENDING}" for c in cases} | {f"{c}{FILE_ENDING}" for c in cases}
        drop += _files_to_drop(folder, raw_dir, dataset_id, rf"{prefix}_\d{{4,}}(_0000)?{re.escape(FILE_ENDING)}",
                               expected)
        folders[key] = folder
        jobs += [(subset, key, i, c) for i, c in enumerate(cases)]
    for f in drop:  # only once both datasets passed the checks
        f.unlink(missing_ok=True)
    for key, folder in folders.items():
        for sub in ("imagesTr", "labelsTr") if key == "labeled" else ("imagesTr",):
            (folder / sub).mkdir(parents=True, exist_ok=True)

    for subset, key, i, case in tqdm(jobs, desc="synthetic CT", unit="case", disable=not progress):
        image, label = phantom_to_sitk(make_phantom(_case_rng(seed, subset, i), size, phase))
        _write_image_atomic(image, folders[key] / "imagesTr" / f"{case}_0000{FILE_ENDING}")
        if key == "labeled":
            _write_image_atomic(label, folders[key] / "labelsTr" / f"{case}{FILE_ENDING}")

    for subset, key, dataset_id, name, n, _ in subsets:
        if key not in folders:
            continue
        labeled = key == "labeled"
        write_json(folders[key] / "dataset.json", {
            "channel_names": {"0": "CT"},
            "labels": dict(LABELS) if labeled else {"background": 0},
            "numTraining": n,
            "file_ending": FILE_ENDING,
            "name": name,
            "description": (f"Synthetic abdomen-like CT ({size}, {phase} phase, seed {seed}) from ssl_make_demo_data"
                            + ("; organ labels" if labeled else "; unlabeled pool for self-supervised pretraining")),
            "licence": "CC0 (synthetic data)",
        })
        logger.debug("wrote %d %s case(s) to %s", n, key, folders[key])
    return folders
