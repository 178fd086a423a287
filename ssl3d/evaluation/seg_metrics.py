"""Per-case scores of a folder of predicted segmentations against reference labels.

* Dice (and IoU): nnU-Net's own evaluation (``compute_metrics_on_folder``), exactly the numbers nnU-Net reports.
  MONAI's ``compute_dice`` agrees wherever the reference has the class (a test checks it) but scores an empty
  reference differently (nan or 1 where nnU-Net gives nan or 0), so nnU-Net's stays the source.
* Normalized surface Dice (NSD) at a per-class tolerance in mm and the 95th-percentile Hausdorff distance
  (HD95, mm): MONAI's ``compute_surface_dice`` (surface elements weighted by their area, ``use_subvoxels``, as
  in Nikolov et al.) and ``compute_hausdorff_distance(percentile=95)`` (symmetric), both on the image's own voxel
  spacing (read with the label file, in the array's axis order).

Empty masks, per case and class, are decided here instead of MONAI's nan / inf:

* the class is in neither reference nor prediction: Dice, NSD and HD95 are ``None`` (nnU-Net: nan) and the
  case is left out of that class's mean over cases;
* the class is in only one of them (missed or hallucinated organ): Dice 0, NSD 0 and HD95 = the image's
  diagonal in mm (the largest distance inside the volume), so the worst case counts rather than vanishing.

NSD tolerances: the labeled dataset.json's ``ssl3d_nsd_tolerance_mm`` (one number for all classes, or
``{label name: mm}``), else :data:`DEFAULT_NSD_TOLERANCE_MM` for every class: 2 mm, about the in-plane
extent of two CT voxels, the order of the tolerances surface-Dice studies of abdominal organs use; below the
slice thickness it only accepts boundaries in the right slice.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_NSD_TOLERANCE_MM = 2.0
TOLERANCE_KEY = "ssl3d_nsd_tolerance_mm"


def nsd_tolerances(dataset_json: dict, labels: dict[int, str], source: Path | None = None) -> dict[int, float]:
    """Tolerance in mm per foreground label value, from ``dataset_json[TOLERANCE_KEY]`` or the default."""
    from ssl3d.utils import BadInputError

    given = dataset_json.get(TOLERANCE_KEY, DEFAULT_NSD_TOLERANCE_MM)
    per_name = given if isinstance(given, dict) else {name: given for name in labels.values()}
    unknown = sorted(set(per_name) - set(labels.values()))
    if unknown:
        raise BadInputError(source, f"{TOLERANCE_KEY}: no label named '{unknown[0]}'")
    out = {}
    for value, name in labels.items():
        tol = per_name.get(name, DEFAULT_NSD_TOLERANCE_MM)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise BadInputError(source, f"{TOLERANCE_KEY}: '{name}' needs a finite non-negative number of mm, "
                                        f"got {tol!r}")
        out[value] = float(tol)
    return out


def surface_scores(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                   labels: Sequence[int], tolerances: dict[int, float]) -> dict[int, tuple[float | None, float | None]]:
    """``{label: (NSD, HD95 in mm)}`` of one case; ``spacing`` in mm per array axis. Empty masks as documented
    in the module."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    if reference.shape != prediction.shape or len(spacing) != reference.ndim:
        raise ValueError(f"reference {reference.shape}, prediction {prediction.shape}, spacing {tuple(spacing)}")
    spacing = [float(s) for s in spacing]
    diagonal = float(math.sqrt(sum((n * s) ** 2 for n, s in zip(reference.shape, spacing))))
    out = {}
    for value in labels:
        r, p = reference == value, prediction == value
        if not r.any() and not p.any():
            out[value] = (None, None)
        elif not r.any() or not p.any():
            out[value] = (0.0, diagonal)
        else:
            rt, pt = (torch.from_numpy(m)[None, None].float() for m in (r, p))
            with warnings.catch_warnings():  # MONAI's own internal calls of its deprecated always_return_as_numpy
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                nsd = compute_surface_dice(pt, rt, [tolerances[value]], include_background=True, spacing=spacing,
                                           use_subvoxels=True)
                hd = compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=spacing)
            out[value] = (float(nsd.item()), float(hd.item()))
    return out


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else None


def score_folder(reference_dir: Path, prediction_dir: Path, labels: dict[int, str], tolerances: dict[int, float],
                 file_ending: str = ".nii.gz") -> dict:
    """Every prediction against its reference: per-case Dice, NSD and HD95 per class (``cases``), their means over
    cases per class and the means over classes (``mean_dice`` is nnU-Net's foreground mean). Writes nnU-Net's
    ``summary.json`` into ``prediction_dir``."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    res = compute_metrics_on_folder(str(reference_dir), str(prediction_dir), str(Path(prediction_dir) / "summary.json"),
                                    SimpleITKIO(), file_ending, sorted(labels), num_processes=1, chill=False)
    io, cases = SimpleITKIO(), []
    for entry in res["metric_per_case"]:
        ref, props = io.read_seg(entry["reference_file"])
        pred, _ = io.read_seg(entry["prediction_file"])
        surf = surface_scores(ref[0], pred[0], props["spacing"], sorted(labels), tolerances)
        dice = {labels[k]: (None if math.isnan(v["Dice"]) else float(v["Dice"])) for k, v in entry["metrics"].items()}
        cases.append({"case": Path(entry["reference_file"]).name[: -len(file_ending)], "dice": dice,
                      "nsd": {labels[k]: v[0] for k, v in surf.items()},
                      "hd95": {labels[k]: v[1] for k, v in surf.items()}})
    per_class = {m: {name: _mean([c[m][name] for c in cases]) for name in labels.values()} for m in ("nsd", "hd95")}
    return {"dice": {labels[k]: float(v["Dice"]) for k, v in res["mean"].items()},
            "iou": {labels[k]: float(v["IoU"]) for k, v in res["mean"].items()},
            "mean_dice": float(res["foreground_mean"]["Dice"]),
            "nsd": per_class["nsd"], "mean_nsd": _mean(list(per_class["nsd"].values())),
            "hd95": per_class["hd95"], "mean_hd95": _mean(list(per_class["hd95"].values())),
            "nsd_tolerance_mm": {labels[k]: v for k, v in tolerances.items()}, "cases": cases}
