"""Features of a pretrained ssl3d encoder: one embedding per image, optionally the per-stage feature maps.

Each image is preprocessed exactly like the pretraining pool (``read_case`` + ``preprocess_array`` with the
plans of the results folder: same orientation, spacing and normalization), zero-padded at the far end to at
least one patch and to a multiple of the encoder's coarsest stride (0 is what nnU-Net's loader pads with),
then encoded densely (no mask) by a sliding window of the trained patch size with 50 % overlap. Windows
start on the coarsest-stride grid, so every stage's window maps land on whole cells of one whole-image map;
overlapping cells are averaged. The embedding is the global average of the stitched deepest map over the
image, each cell weighted by the fraction of its voxels that are image rather than padding.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from ssl3d.architectures.encoders import DownstreamEncoder, stage_maps
from ssl3d.data.readers import CaseSource, check_unique_ids, discover_folder, file_ending, read_case
from ssl3d.preprocessing.preprocessor import preprocess_array
from ssl3d.training.export import downstream_network
from ssl3d.training.external import for_downstream, load_pretrained
from ssl3d.utils import BadInputError, atomic_write, read_json, write_json

logger = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
TILE_STEP = 0.5  # window overlap 50 %, as nnU-Net's sliding-window prediction
_CHANNEL_NAME = re.compile(r"^(.+)_(\d{4})$")


def encoder_stage_features(method: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Dense (unmasked) encoder features of any ssl3d method: a list of ``(B, C, z, y, x)`` maps, finest first.

    SparK/HySparK ``encode`` already give the per-stage list; the MAE ViT gives one ``(B, dim, *grid)`` map
    without a mask. A token output ``(tokens (B, N, dim), vis, grid)`` is folded back onto its grid.
    """
    if isinstance(method, DownstreamEncoder):  # a foreign checkpoint's downstream encoder: its stage maps
        return method(x)
    encode = getattr(method, "encode", None)
    out = encode(x, None) if encode is not None else method.encoder(x)
    if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], tuple):  # (tokens, vis, grid)
        tokens, _, grid = out
        if tokens.shape[1] != math.prod(grid):
            raise ValueError(f"{tokens.shape[1]} tokens do not fill the grid {grid}; pass no mask")
        out = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    return stage_maps(out, type(method).__name__)


@dataclass
class Encoder:
    """A pretrained method ready for dense feature extraction, with its stage geometry."""

    method: torch.nn.Module
    plans: dict
    info: dict
    folder: Path
    checkpoint: Path
    patch_size: tuple[int, ...]
    in_channels: int
    device: torch.device
    stage_channels: list[int] = field(default_factory=list)
    stage_strides: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def alignment(self) -> tuple[int, ...]:
        """Per axis, a step every stage's stride divides (window starts on it keep all maps cell-aligned)."""
        return tuple(math.lcm(*(s[a] for s in self.stage_strides)) for a in range(3))

    def describe(self) -> dict:
        cfg = self.plans["configurations"][CONFIGURATION]
        return {"method": self.info["name"], "checkpoint": str(self.checkpoint.resolve()),
                "results_folder": str(self.folder.resolve()),
                "configuration": CONFIGURATION, "spacing": list(cfg["spacing"]), "patch_size": list(self.patch_size),
                "transpose_forward": list(self.plans["transpose_forward"]), "in_channels": self.in_channels,
                "stage_channels": self.stage_channels, "stage_strides": [list(s) for s in self.stage_strides],
                "embedding_dim": self.stage_channels[-1], "tile_step": TILE_STEP,
                "embedding": "image-voxel-weighted mean of the stitched deepest stage map"}


def _stage_geometry(method: torch.nn.Module, patch: Sequence[int], in_channels: int,
                    device: torch.device) -> tuple[list[int], list[tuple[int, ...]]]:
    """Channels and strides per stage, from one forward pass of a zero patch."""
    with torch.inference_mode():
        maps = encoder_stage_features(method, torch.zeros(1, in_channels, *patch, device=device))
    strides = []
    for f in maps:
        shape = tuple(f.shape[2:])
        if any(p % s for p, s in zip(patch, shape)):
            raise ValueError(f"stage map {shape} does not divide the patch {tuple(patch)}")
        strides.append(tuple(p // s for p, s in zip(patch, shape)))
    return [int(f.shape[1]) for f in maps], strides


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(None, "-device cuda: CUDA is not available on this machine (use -device cpu)")
    return dev


def load_encoder(results: str | os.PathLike, fold: str = "0", device: str | torch.device = "cpu",
                 n_channels: int | None = None) -> Encoder:
    """The pretrained encoder in eval mode on ``device``: an ssl3d results folder's method (weights loaded
    strictly) or a foreign checkpoint's (nnssl, MONAI) downstream encoder, loaded key by key, with its input
    projection adapted to ``n_channels`` where the format allows (default: the pretraining's channels)."""
    dev = resolve_device(device)
    src = load_pretrained(results, fold)
    if src.method is not None:
        module: torch.nn.Module = src.method
        if n_channels is not None and n_channels != src.n_channels:
            raise BadInputError(src.checkpoint, f"pretrained on {src.n_channels} channel(s), the images have "
                                                f"{n_channels}")
    else:
        src = for_downstream(src, n_channels)
        if src.plans["configurations"][CONFIGURATION].get("spacing") is None:
            raise BadInputError(src.checkpoint, "the pretraining plan has no spacing (nnssl 'noresample'): "
                                                "features need a fixed target spacing")
        module = DownstreamEncoder(downstream_network(src, 2))
    module = module.to(dev).eval()
    patch = tuple(int(p) for p in getattr(module, "patch_size", src.patch_size))
    channels, strides = _stage_geometry(module, patch, src.n_channels, dev)
    return Encoder(module, src.plans, {**src.info, "name": src.method_name}, src.folder or src.checkpoint.parent,
                   src.checkpoint, patch, src.n_channels, dev, channels, strides)


def _window_starts(size: int, tile: int, align: int) -> list[int]:
    """50 %-overlap starts on the ``align`` grid (``size`` and ``tile`` are multiples of ``align``)."""
    steps = compute_steps_for_sliding_window((size // align,), (tile // align,), TILE_STEP)[0]
    return sorted({s * align for s in steps})


@torch.inference_mode()
def embed_image(encoder: Encoder, image: np.ndarray | torch.Tensor, stages: bool = False) -> dict:
    """Encode one preprocessed ``(C, Z, Y, X)`` image by sliding window.

    Returns ``{"embedding": (C_deep,) float32, "embedding_max": (C_deep,) float32, "stages": [(C_s, z_s, y_s,
    x_s) float32, ...] or None}``: the image-weighted average and the maximum of the stitched deepest map over the
    cells that hold any image voxel; the stage maps cover those cells.
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.dim() != 4 or x.shape[0] != encoder.in_channels:
        raise ValueError(f"expected a ({encoder.in_channels}, Z, Y, X) image, got {tuple(x.shape)}")
    shape, patch, align = tuple(x.shape[1:]), encoder.patch_size, encoder.alignment
    padded = tuple(max(p, math.ceil(s / a) * a) for s, p, a in zip(shape, patch, align))
    # pad at the far end only: voxel 0 stays at cell 0 of every stage map
    x = F.pad(x, [v for s, p in zip(reversed(shape), reversed(padded)) for v in (0, p - s)])
    keep = range(len(encoder.stage_strides)) if stages else [len(encoder.stage_strides) - 1]
    sums = {i: torch.zeros(encoder.stage_channels[i], *(p // r for p, r in zip(padded, encoder.stage_strides[i])))
            for i in keep}
    counts = {i: torch.zeros(1, *sums[i].shape[1:]) for i in keep}
    starts = [_window_starts(s, p, a) for s, p, a in zip(padded, patch, align)]
    for z in starts[0]:
        for y in starts[1]:
            for xx in starts[2]:
                window = x[None, :, z:z + patch[0], y:y + patch[1], xx:xx + patch[2]].to(encoder.device)
                maps = encoder_stage_features(encoder.method, window)
                for i in keep:
                    r = encoder.stage_strides[i]
                    sl = tuple(slice(o // ri, (o + p) // ri) for o, p, ri in zip((z, y, xx), patch, r))
                    sums[i][(slice(None), *sl)] += maps[i][0].float().cpu()
                    counts[i][(slice(None), *sl)] += 1
    stitched = {i: sums[i] / counts[i] for i in keep}
    deep = len(encoder.stage_strides) - 1
    r = encoder.stage_strides[deep]
    # fraction of image (not padding) voxels in every deepest cell: the pooling weights
    valid = F.pad(torch.ones(1, 1, *shape), [v for s, p in zip(reversed(shape), reversed(padded)) for v in (0, p - s)])
    weight = F.avg_pool3d(valid, r, r)[0]
    embedding = (stitched[deep] * weight).sum((1, 2, 3)) / weight.sum()
    embedding_max = stitched[deep].masked_fill(weight == 0, -math.inf).amax((1, 2, 3))
    out_stages = None
    if stages:
        out_stages = [stitched[i][(slice(None), *(slice(0, math.ceil(s / ri)) for s, ri in
                                                   zip(shape, encoder.stage_strides[i])))].numpy()
                      for i in keep]
    return {"embedding": embedding.numpy().astype(np.float32),
            "embedding_max": embedding_max.numpy().astype(np.float32), "stages": out_stages, "shape": shape}


def discover_images(folder: str | os.PathLike, n_channels: int) -> list[CaseSource]:
    """Cases of an input folder: nnU-Net naming (``<case>_0000<ext>`` ...) is grouped into channels, any other
    image file (or DICOM series) is a single-channel case of its own."""
    cases = discover_folder(Path(folder))
    names = [(c, _CHANNEL_NAME.match(c.case_id)) for c in cases]
    nnunet = all(c.kind == "file" and m for c, m in names) and any(m.group(2) == "0000" for _, m in names)
    if nnunet:
        grouped: dict[str, dict[int, str]] = defaultdict(dict)
        for c, m in names:
            grouped[m.group(1)][int(m.group(2))] = c.first_file
        cases = []
        for cid, chans in grouped.items():
            ref = chans.get(0) or next(iter(chans.values()))
            ending = file_ending(ref)
            for ch in range(n_channels):
                if ch not in chans:
                    raise BadInputError(Path(ref).parent / f"{cid}_{ch:04d}{ending}",
                                        f"missing channel file for case '{cid}' (the encoder takes {n_channels})")
            if len(chans) > n_channels:
                raise BadInputError(ref, f"case '{cid}' has {len(chans)} channel files; the encoder takes {n_channels}")
            cases.append(CaseSource(cid, [[chans[ch]] for ch in range(n_channels)], str(folder), "file"))
    elif n_channels != 1:
        raise BadInputError(folder, f"the encoder takes {n_channels} channels: name images <case>_0000<ext>, "
                                    f"<case>_0001<ext>, ...")
    for _, err in check_unique_ids(cases):
        raise err
    return sorted(cases, key=lambda c: c.case_id)


def preprocess_case(case: CaseSource, plans: dict) -> np.ndarray:
    """Read and preprocess one case as the pretraining pool was: ``(C, Z, Y, X)`` float32."""
    data, props = read_case(case)
    data, _, _ = preprocess_array(data, props, plans, CONFIGURATION)
    return data


def _case_done(path: Path, stages: bool) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as f:
            return {"embedding", "embedding_max"} <= set(f.files) and (not stages or "stage_0" in f.files)
    except Exception:  # unreadable leftovers are redone
        return False


def extract_features(results: str | os.PathLike, inputs: str | os.PathLike, output: str | os.PathLike,
                     stages: bool = False, device: str = "cpu", fold: str = "0", overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Write ``<output>/<case>.npz`` per image, ``embeddings.npz`` (all cases) and ``features.json``.

    Resumable: cases whose npz exists are skipped unless ``overwrite`` (or ``stages`` is asked for and the
    file has none). A bad input stops the run with :class:`BadInputError`; finished cases stay complete.
    Returns the ``features.json`` content plus ``done`` / ``skipped`` case ids.
    """
    encoder = load_encoder(results, fold, device)
    cases = discover_images(inputs, encoder.in_channels)
    out = Path(output)
    meta = {**encoder.describe(), "fold": str(fold), "inputs": str(Path(inputs).resolve()),
            "stages_saved": bool(stages)}
    old = out / "features.json"
    if old.is_file() and not overwrite and read_json(old).get("checkpoint") != meta["checkpoint"]:
        raise BadInputError(out, f"holds features of another checkpoint ({read_json(old).get('checkpoint')}); "
                                 "use --overwrite or another output folder")
    done, skipped = [], []
    for case in tqdm(cases, desc="features", unit="case", disable=not progress):
        target = out / f"{case.case_id}.npz"
        if not overwrite and _case_done(target, stages):
            skipped.append(case.case_id)
            continue
        image = preprocess_case(case, encoder.plans)
        res = embed_image(encoder, image, stages)
        arrays = {"embedding": res["embedding"], "embedding_max": res["embedding_max"],
                  "preprocessed_shape": np.asarray(res["shape"], np.int64)}
        for i, f in enumerate(res["stages"] or []):
            arrays[f"stage_{i}"] = f
        atomic_write(target, lambda fh: np.savez(fh, **arrays))
        done.append(case.case_id)
    if skipped:
        logger.info("%d of %d cases already had features; skipped them (--overwrite to redo)", len(skipped), len(cases))
    ids = [c.case_id for c in cases]
    matrix = np.stack([np.load(out / f"{cid}.npz")["embedding"] for cid in ids]).astype(np.float32)
    atomic_write(out / "embeddings.npz", lambda fh: np.savez(fh, case_ids=np.asarray(ids), embeddings=matrix))
    meta["num_cases"] = len(ids)
    write_json(old, meta)
    logger.info("features of %d cases (%d new) in %s", len(ids), len(done), out)
    return {**meta, "done": done, "skipped": skipped}
