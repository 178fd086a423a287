"""Names and one-line descriptions of the registered SSL methods, without importing torch.

Command-line ``-m`` choices and ``--help`` read this table so they answer in a fraction of a second; a test checks
it against the real registry (``ssl3d.training.methods.available_methods``). Methods registered at run time (tests,
plug-ins) are added once the registry has been imported."""
from __future__ import annotations

import sys

METHOD_DESCRIPTIONS = {
    "byol": "BYOL: online predictor regresses an EMA target's projection of the other view (2 - 2 cos)",
    "hyspark": "HySparK: sparse MedNeXt CNN + ViT on visible tokens, bottom-up masks, skip concat",
    "mae": "MAE pretraining of the official Primus (dna EVA ViT) on visible patches, light EVA decoder",
    "mim": "MiM: multi-level mask-in-mask reconstruction + cross-level InfoNCE on the HySparK backbone",
    "mocov2": "MoCo v2: momentum key encoder (0.999), queue of negatives (65536), InfoNCE at 0.07",
    "simclr": "SimCLR: two overlapping augmented crops, ResEnc encoder, NT-Xent over the global batch",
    "smit": "SMIT: Swin student + EMA teacher; masked image prediction, iBOT local + DINO global distillation",
    "spark": "SparK: sparse ResEnc CNN (planned topology), densify + light decoder, skip addition",
    "voco": "VoCo: overlap-fraction prediction between random and grid base crops, with an EMA teacher",
}


def method_descriptions() -> dict[str, str]:
    """The static table, plus methods registered in this process if the registry is loaded already."""
    out = dict(METHOD_DESCRIPTIONS)
    registry = sys.modules.get("ssl3d.training.methods.registry")
    if registry is not None:
        out.update({k: v.description for k, v in registry._REGISTRY.items()})
    return dict(sorted(out.items()))
