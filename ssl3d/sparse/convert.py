"""Dense → sparse conversion that shares parameters, and the masked-forward helper.

``sparsify(model)`` returns a structural copy of ``model`` whose leaf modules are replaced by their sparse
twins (same classes' subclasses, same parameter/buffer *objects*, same state_dict keys). Container modules
(nn.Sequential, dynamic-network-architectures' ResidualEncoder / StackedResidualBlocks / BasicBlockD /
ConvDropoutNormReLU / StackedConvBlocks, our MedNeXt stages) keep their own forward: the mask travels inside
the ``SparseTensor`` they pass along, so no dense class is copied or re-implemented here.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ssl3d.layers import LayerNormCF

from .modules import (ZERO_PRESERVING, SparseAvgPool3d, SparseBatchNorm3d, SparseConv3d,
                      SparseConvTranspose3d, SparseGroupNorm, SparseInstanceNorm3d, SparseLayerNormCF,
                      SparseMaxPool3d, _SparseMixin, pointwise_class)
from .ops import BACKENDS
from .tensor import SparseTensor

log = logging.getLogger(__name__)

SPARSE_TWINS: dict[type, type] = {
    nn.Conv3d: SparseConv3d,
    nn.ConvTranspose3d: SparseConvTranspose3d,
    nn.MaxPool3d: SparseMaxPool3d,
    nn.AvgPool3d: SparseAvgPool3d,
    nn.BatchNorm3d: SparseBatchNorm3d,
    nn.InstanceNorm3d: SparseInstanceNorm3d,
    nn.GroupNorm: SparseGroupNorm,
    LayerNormCF: SparseLayerNormCF,
}
# modules without their own parameters whose forward only calls children (safe to keep as they are)
_CONTAINER_OK = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_pointwise(m: nn.Module) -> bool:
    return type(m).__name__ in ZERO_PRESERVING or isinstance(m, (nn.Sigmoid, nn.Softplus))


def _convert_leaf(m: nn.Module, backend: str) -> None:
    if isinstance(m, _SparseMixin):
        m.backend = backend
        return
    twin = SPARSE_TWINS.get(type(m))
    if twin is not None:
        twin.from_dense(m, backend)
        return
    if _is_pointwise(m):
        pointwise_class(type(m)).from_dense(m, backend)
        return
    raise TypeError(f"sparsify: no sparse twin for {type(m).__module__}.{type(m).__name__}; a module that mixes "
                    "voxels (e.g. squeeze-excitation's global pooling) would leak masked content")


def _walk(m: nn.Module, backend: str) -> None:
    children = list(m.children())
    own_params = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
    if not children or type(m) in SPARSE_TWINS or isinstance(m, _SparseMixin) or own_params:
        _convert_leaf(m, backend)
        return
    if type(m).__name__ == "SqueezeExcite":
        raise TypeError("sparsify: squeeze-excitation pools globally and is not supported in sparse encoders")
    for c in children:
        _walk(c, backend)


def sparsify(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Sparse twin of ``model`` sharing its parameters and buffers (same state_dict keys and tensors).

    With ``inplace=False`` the dense ``model`` is left untouched (its modules are not converted) but every
    parameter/buffer object is shared, so training the sparse twin trains the dense one. Called with a plain
    tensor, the twin behaves exactly like the dense model. Raises TypeError for modules that cannot be made
    sparse without leaking masked content.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not inplace:
        memo: dict[int, Any] = {id(t): t for t in model.parameters()}
        memo.update({id(t): t for t in model.buffers()})
        model = copy.deepcopy(model, memo)
    _walk(model, backend)
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every sparse module of ``model`` to ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    for m in model.modules():
        if isinstance(m, _SparseMixin):
            m.backend = backend
    return model


def _unwrap(out: Any) -> Any:
    if isinstance(out, SparseTensor):
        return out.features
    if isinstance(out, (list, tuple)):
        return type(out)(_unwrap(o) for o in out)
    if isinstance(out, dict):
        return {k: _unwrap(v) for k, v in out.items()}
    return out


def sparse_forward(model: nn.Module, x: torch.Tensor, cell_mask: torch.Tensor | None) -> Any:
    """Run a sparsified model on ``x`` with the boolean cell grid ``(B, gz, gy, gx)`` (True = visible).

    The mask of every resolution is derived from the cell grid on demand (nearest neighbour), so anisotropic
    strides need no configuration. Returns the model's output structure with plain tensors (zero at masked
    voxels). ``cell_mask=None`` runs the dense model.
    """
    if cell_mask is None:
        return model(x)
    return _unwrap(model(SparseTensor.from_dense(x, cell_mask)))


__all__ = ["sparsify", "set_backend", "sparse_forward", "SPARSE_TWINS"]
