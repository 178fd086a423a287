"""Two augmented views per case for the contrastive methods, made in nnU-Net's data-loader workers.

For each case the loader crops a region of ``ceil(patch · (2 − min_overlap))`` voxels per axis (nnU-Net's
random crop with padding), then cuts two patch-size views at independent random offsets inside it: any two
such views overlap by at least ``min_overlap`` of the patch on every axis (SimCLR in 3D: ≥ 50 %). Each view
then gets its own draw of the intensity and spatial augmentations (noise, blur, brightness, contrast, low
resolution, gamma, mirroring, 90° rotations in planes whose axes have equal extent). Batches are
``(B, 2, C, *patch)``. Randomness comes from the worker's seeded numpy/torch generators (``worker_seeds``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from threadpoolctl import threadpool_limits

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def view_region(patch_size: Sequence[int], min_overlap: float) -> list[int]:
    """Region from which two views of ``patch_size`` always overlap by ``min_overlap`` per axis."""
    if not 0 <= min_overlap <= 1:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    return [int(math.ceil(p * (2 - min_overlap) - 1e-9)) for p in patch_size]


def contrastive_view_transforms(patch_size: Sequence[int]) -> ComposeTransforms:
    """Per-view augmentations: stronger and more frequent than nnU-Net's segmentation defaults (contrastive
    learning needs the two views to differ in appearance), no elastic/scale deformation (the crop offsets
    already move content)."""
    square = [a for a in range(3) if sum(patch_size[a] == patch_size[b] for b in range(3)) > 1]
    transforms = [
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.5),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1), apply_probability=0.5),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.7, 1.3)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.8),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.7, 1.3)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.8),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=1),
                        apply_probability=0.3),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.5),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ]
    if len(square) >= 2:  # a 90° turn keeps the shape only in planes of equal extent
        transforms.append(RandomTransform(Rot90Transform(num_axis_combinations=1, allowed_axes=set(square)),
                                          apply_probability=0.5))
    return ComposeTransforms(transforms)


class TwoViewDataLoader(nnUNetDataLoader):
    """nnU-Net's loader (random case order, random crop with zero padding) cropping a region per case and
    returning two independently augmented, overlapping views of the patch size: ``data (B, 2, C, *patch)``."""

    def __init__(self, data, batch_size: int, patch_size: Sequence[int], label_manager, min_overlap: float = 0.5,
                 transforms: ComposeTransforms | None = None):
        self.view_patch = [int(p) for p in patch_size]
        region = view_region(self.view_patch, min_overlap)
        super().__init__(data, batch_size, region, region, label_manager, oversample_foreground_percent=0.0,
                         transforms=None)
        self.view_transforms = transforms
        self.min_overlap = min_overlap

    def view_offsets(self) -> list[list[int]]:
        """Lower corners of the two views inside the region (numpy's global generator: seeded per worker)."""
        return [[int(np.random.randint(0, r - p + 1)) for r, p in zip(self.patch_size, self.view_patch)]
                for _ in range(2)]

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        out = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, _, _, _ = self._data.load_case(key)
                lbs, ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = [[0, data.shape[0]]] + [[lo, hi] for lo, hi in zip(lbs, ubs)]
                region = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                for v, lo in enumerate(self.view_offsets()):
                    view = region[:, lo[0]:lo[0] + self.view_patch[0], lo[1]:lo[1] + self.view_patch[1],
                                  lo[2]:lo[2] + self.view_patch[2]].contiguous()
                    if self.view_transforms is not None:
                        view = self.view_transforms(image=view)["image"]
                    if out is None:
                        out = torch.empty((len(keys), 2, *view.shape), dtype=torch.float32)
                    out[j, v] = view
        return {"data": out, "target": None, "keys": keys}
