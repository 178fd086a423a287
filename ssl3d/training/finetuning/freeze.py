"""The pretrained encoder of a downstream network, and keeping it frozen (``ssl3d_finetune.freeze_encoder``).

A frozen encoder is the probe of what a pretraining learned (linear probing in MAE/DINO, here with the decoder
and head trained): its weights stay exactly as exported. :func:`encoder_parameters` is the split that
``SSLFinetuneTrainer`` uses for the encoder learning-rate factor, the decoder-only warm-up and freezing:

* parameters: ``requires_grad`` off and left out of the optimizer (weight decay cannot touch them);
* mode: the whole encoder runs in eval mode during training, so normalization layers with running statistics
  (BatchNorm) neither update nor use batch statistics, and dropout / stochastic depth are off: the encoder is a
  fixed function of its input. nnU-Net's InstanceNorm (``track_running_stats=False``, its default) has no running
  statistics and normalizes each sample by its own statistics in both modes; its affine weights are frozen with
  the other parameters, so it needs nothing else.
"""
from __future__ import annotations

import torch
from torch import nn

from ssl3d.architectures.encoders import encoder_roots  # swinViT | down_projection + eva (Primus) | encoder


def _is_encoder_key(name: str, roots: tuple[str, ...]) -> bool:
    return name.split(".", 1)[0] in roots


def encoder_parameters(network: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder parameters, all others). ``named_parameters`` lists a shared module once, under its first name,
    so nnU-Net's ``decoder.encoder`` (the same module as ``encoder``) is not counted as decoder."""
    roots = encoder_roots(network)
    enc, rest = [], []
    for name, p in network.named_parameters():
        (enc if _is_encoder_key(name, roots) else rest).append(p)
    return enc, rest


def set_encoder_trainable(network: nn.Module, trainable: bool) -> None:
    for p in encoder_parameters(network)[0]:
        p.requires_grad_(trainable)


def freeze_encoder_mode(network: nn.Module) -> None:
    """Eval mode for the encoder (call after ``network.train()``): running statistics fixed, dropout off."""
    for name in encoder_roots(network):
        getattr(network, name).eval()


def encoder_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state (parameters and buffers such as running statistics) under the network's keys."""
    roots = encoder_roots(network)
    return {k: v.detach().clone() for k, v in network.state_dict().items() if _is_encoder_key(k, roots)}
