"""Networks from a plans ``architecture`` entry, built by nnU-Net's own function (what stock nnU-Net builds)."""
from __future__ import annotations

import inspect
import pydoc

from torch import nn

from ssl3d.layers import total_stride


def takes_deep_supervision(network_class_name: str) -> bool:
    """Whether the class accepts ``deep_supervision`` (nnU-Net's U-Nets do; dna's ``Primus`` has a single output
    and no such argument, so nnU-Net's builder, which always passes it from a trainer, would fail)."""
    cls = pydoc.locate(network_class_name)
    if cls is None:
        return True  # nnU-Net's builder searches dna itself and reports what it cannot find
    params = inspect.signature(cls.__init__).parameters
    return "deep_supervision" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_network_from_plans(architecture: dict, in_channels: int, num_classes: int,
                             deep_supervision: bool | None = True) -> nn.Module:
    """``architecture``: ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` as in nnU-Net plans.
    ``deep_supervision`` is passed only to classes that take it (None: never)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    name = architecture["network_class_name"]
    if deep_supervision is not None and not takes_deep_supervision(name):
        deep_supervision = None
    return get_network_from_plans(name, architecture["arch_kwargs"], architecture.get("_kw_requires_import", []),
                                  in_channels, num_classes, deep_supervision=deep_supervision)


def scaled_architecture(architecture: dict, size: str) -> dict:
    """``planned``: as in the plans; ``tiny``: 1/4 width, one block per stage (tests, CPU demos)."""
    if size in (None, "planned"):
        return architecture
    if size != "tiny":
        raise ValueError(f"unknown size '{size}' (planned, tiny)")
    arch = {**architecture, "arch_kwargs": dict(architecture["arch_kwargs"])}
    kw = arch["arch_kwargs"]
    kw["features_per_stage"] = [max(4, c // 4) for c in kw["features_per_stage"]]
    kw["n_blocks_per_stage"] = [1] * kw["n_stages"]
    return arch


def input_divisor(architecture: dict) -> tuple[int, ...] | None:
    """The per-axis multiple every input of the plans network must be, or None when it takes one fixed shape only.

    nnU-Net's U-Nets (and ``HybridUNet``): the product of the stage strides (what its decoder's skips need);
    ``SwinUNETRNet``: patch embedding × 2 ** 4 merges (32 for patch 2); dna's ``Primus``: None (its absolute
    position embedding covers the fixed token grid of ``input_shape``); a class without strides: None.
    """
    name = architecture["network_class_name"].rsplit(".", 1)[-1]
    kw = architecture.get("arch_kwargs", {})
    if name == "SwinUNETRNet":
        return (int(kw.get("patch_size", 2)) * 2 ** 4,) * 3
    strides = kw.get("strides")
    if name == "Primus" or not strides:
        return None
    return total_stride(strides)
