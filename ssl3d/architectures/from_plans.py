"""Networks from a plans ``architecture`` entry, built by nnU-Net's own function (what stock nnU-Net builds)."""
from __future__ import annotations

from torch import nn


def build_network_from_plans(architecture: dict, in_channels: int, num_classes: int,
                             deep_supervision: bool = True) -> nn.Module:
    """``architecture``: ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` as in nnU-Net plans."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture.get("_kw_requires_import", []), in_channels, num_classes,
                                  deep_supervision=deep_supervision)


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
