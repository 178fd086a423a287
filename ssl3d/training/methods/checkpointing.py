"""Activation checkpointing of whole encoder/decoder stages (``ssl_pretrain --checkpoint-activations``).

A checkpointed module keeps only its input and recomputes its inner activations in backward
(``torch.utils.checkpoint``, non-reentrant, so keyword arguments, DDP and autocast work; autocast state is
restored for the recomputation by torch). Parameters, state_dict keys and outputs are unchanged: the module's
``forward`` is replaced on the instance (bound with ``types.MethodType``, so ``copy.deepcopy`` rebinds it to the
copy). A ``SparseTensor`` input is passed as its plain storage tensor and rewrapped inside the checkpointed
function: a fresh wrapper per run, so the dense/compact form that one run caches on it cannot make the
recomputation skip (and so mis-order) saved tensors. Masks travel in the shared ``MaskCache`` (mask-only
caches, no autograd state): they are the ones drawn for the step, never re-drawn.
"""
from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl3d.sparse import MaskCache, SparseTensor

_FLAG = "_ssl3d_checkpointed"


def _run(module: nn.Module, masks: MaskCache | None, shape: torch.Size | None, compact: bool, x: torch.Tensor,
         *args: Any, **kwargs: Any) -> Any:
    if masks is not None:
        x = SparseTensor.from_compact(x, masks, shape) if compact else SparseTensor(x, masks)
    return type(module).forward(module, x, *args, **kwargs)


def _checkpointed_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    if not (torch.is_grad_enabled() and self.training):
        return type(self).forward(self, x, *args, **kwargs)
    if isinstance(x, SparseTensor):
        fn = functools.partial(_run, self, x.masks, x.shape, x.is_compact)
        return checkpoint(fn, x.storage, *args, use_reentrant=False, **kwargs)
    return checkpoint(functools.partial(_run, self, None, None, False), x, *args, use_reentrant=False, **kwargs)


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Recompute ``module``'s activations in backward instead of storing them (training mode with grad only)."""
    if not getattr(module, _FLAG, False):
        module.forward = types.MethodType(_checkpointed_forward, module)
        setattr(module, _FLAG, True)
    return module


def is_checkpointed(module: nn.Module) -> bool:
    return bool(getattr(module, _FLAG, False))


__all__ = ["checkpoint_module", "is_checkpointed"]
