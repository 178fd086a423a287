"""Pretrained weights into a downstream network, checked key by key, with one coverage line per import.

Research code that loads with ``strict=False`` and silently transfers nothing (or half an encoder) is what this
guards against: a pretrained key the network lacks, a shape mismatch, an uncovered network key under a
pretrained top-level module, or zero tensors is one :class:`EncoderMismatchError` line.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch

from ssl3d.training.export import EncoderMismatchError

logger = logging.getLogger(__name__)


def coverage(network_state: dict[str, torch.Tensor], encoder_state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """``{top-level module: (network tensors the pretrained weights fill, network tensors)}`` for every top-level
    module of the network; a tensor shared under two names (nnU-Net's ``decoder.encoder.*``) counts where it is."""
    expected = Counter(k.split(".", 1)[0] for k in network_state)
    filled = {network_state[k].data_ptr() for k in encoder_state if k in network_state}
    loaded = Counter(k.split(".", 1)[0] for k, v in network_state.items() if k in encoder_state or
                     (v.numel() and v.data_ptr() in filled))
    return {m: (loaded.get(m, 0), n) for m, n in expected.items()}


def coverage_line(cov: dict[str, tuple]) -> str:
    parts = [f"{m} {a}/{b}" for m, (a, b) in cov.items()]
    return f"{sum(a for a, _ in cov.values())} pretrained tensors loaded ({', '.join(parts)})"


def check_encoder_state(network_state: dict[str, torch.Tensor], encoder_state: dict[str, torch.Tensor]) -> dict:
    """Raise one line unless every pretrained key is in the network with its shape and covers every network key
    under its top-level modules (``encoder.*``, ``eva.*``, ``swinViT.*`` ...). Returns the coverage."""
    missing = [k for k in encoder_state if k not in network_state]
    wrong = [f"{k}: pretrained {tuple(v.shape)} vs network {tuple(network_state[k].shape)}"
             for k, v in encoder_state.items() if k in network_state and network_state[k].shape != v.shape]
    roots = {k.split(".", 1)[0] for k in encoder_state} or {"encoder"}
    uncovered = [k for k in network_state if k.split(".", 1)[0] in roots and k not in encoder_state]
    if missing or wrong or uncovered or not encoder_state:
        detail = "; ".join(filter(None, [
            f"{len(missing)} pretrained keys absent from the network (e.g. {missing[:2]})" if missing else "",
            f"{len(wrong)} shape mismatches (e.g. {wrong[:2]})" if wrong else "",
            f"{len(uncovered)} network encoder keys not pretrained (e.g. {uncovered[:2]})" if uncovered else "",
            "no pretrained encoder weights (zero tensors loaded)" if not encoder_state else ""]))
        raise EncoderMismatchError(f"pretrained encoder does not match the downstream network: {detail}")
    return coverage(network_state, encoder_state)


def load_encoder_state(network: torch.nn.Module, encoder_state: dict[str, torch.Tensor],
                       label: str = "pretrained encoder") -> dict:
    """Check (:func:`check_encoder_state`), copy in place and log one coverage line. Returns the coverage."""
    target = network.state_dict()
    cov = check_encoder_state(target, encoder_state)
    with torch.no_grad():
        for k, v in encoder_state.items():
            target[k].copy_(v)
    logger.info("%s: %s", label, coverage_line(cov))
    return cov
