"""``nn.Module`` sparse twins: subclasses of the dense modules with identical parameters and state_dict keys.

Each forward accepts a plain tensor (→ exactly the dense module) or a ``SparseTensor`` (→ sparse op on
visible voxels, returns a SparseTensor). Set ``module.backend`` to "auto" / "reference" / "gather" (alias "cpu")
/ "triton" (see ``ops.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl3d.layers import LayerNormCF
from ssl3d.utils import as_triple

from . import cpu_backend, ops
from .tensor import SparseTensor


def _out_shape(fn, x: torch.Tensor, *args: Any, **kw: Any) -> tuple[int, ...]:
    """Spatial output shape of a dense op, evaluated on a meta tensor (no compute)."""
    probe = torch.empty((1, 1, *x.shape[2:]), device="meta")
    return tuple(fn(probe, *args, **kw).shape[2:])


class _SparseMixin:
    backend: str = "auto"

    @classmethod
    def from_dense(cls, m: nn.Module, backend: str = "auto") -> nn.Module:
        """Turn ``m`` into this class in place (parameters and buffers stay the same objects)."""
        m.__class__ = cls
        m.backend = backend
        return m


class SparseConv3d(_SparseMixin, nn.Conv3d):
    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise NotImplementedError("sparse conv supports numeric zero padding only")
        shape = (x.shape[0], self.out_channels, *_out_shape(
            lambda p: F.conv3d(p, torch.empty((1, 1, *self.kernel_size), device="meta"), None, self.stride,
                               self.padding, self.dilation), x))
        lin, lout = x.layout(), x.layout(shape[2:])
        probe = x.compact if x.is_compact else x.features
        be = ops.choose_conv_backend(self.backend, probe, self.weight, self.stride, self.padding, self.dilation,
                                     self.groups, lin, lout, bias=self.bias, x_shape=x.shape)
        if be == "gather":  # blocked path: compact in, compact out (norms and activations follow on cells)
            y = cpu_backend.conv3d_compact(x.compact, self.weight, self.bias, self.stride, self.padding,
                                           self.groups, lin, lout, x.shape[0])
            return SparseTensor.from_compact(y, x.masks, shape)
        y = ops.sparse_conv3d(x.features, self.weight, self.bias, self.stride, self.padding, self.dilation,
                              self.groups, lin, lout, backend=self.backend)
        return x.replace(y)


class SparseConvTranspose3d(_SparseMixin, nn.ConvTranspose3d):
    def forward(self, x, output_size=None):
        if not isinstance(x, SparseTensor):
            return super().forward(x, output_size)
        f = x.features
        op = self._output_padding(f, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation)
        shape = tuple((n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
                      zip(f.shape[2:], self.stride, self.padding, self.dilation, self.kernel_size, op))
        y = ops.sparse_conv_transpose3d(f, self.weight, self.bias, self.stride, self.padding, op, self.groups,
                                        self.dilation, x.layout(), x.layout(shape), backend=self.backend)
        return x.replace(y)


def _pools_within_cells(lin, lout, kernel, stride, padding, dilation) -> bool:
    """Non-overlapping pooling windows that tile every cell, with both layouts on the same cell grid: then
    pooling the compact stack gives the output's compact stack (same cells, same order)."""
    k, s, p, d = (as_triple(kernel), as_triple(stride if stride is not None else kernel), as_triple(padding),
                  as_triple(dilation))
    return (lin.cells is lout.cells and k == s and all(v == 0 for v in p) and all(v == 1 for v in d)
            and all(ci == co * si for ci, co, si in zip(lin.cell_size, lout.cell_size, s)))


class SparseMaxPool3d(_SparseMixin, nn.MaxPool3d):
    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.return_indices:
            raise NotImplementedError("sparse max-pool does not return indices")
        args = (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        shape = _out_shape(F.max_pool3d, x, *args)
        lin, lout = x.layout(), x.layout(shape)
        if x.is_compact and _pools_within_cells(lin, lout, self.kernel_size, self.stride, self.padding,
                                                 self.dilation):
            return SparseTensor.from_compact(F.max_pool3d(x.compact, *args), x.masks, (*x.shape[:2], *shape))
        return x.replace(ops.sparse_max_pool3d(x.features, *args, mask_in=lin, mask_out=lout,
                                               backend=self.backend))


class SparseAvgPool3d(_SparseMixin, nn.AvgPool3d):
    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        f = x.features
        args = (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override)
        shape = _out_shape(F.avg_pool3d, f, *args)
        return x.replace(ops.sparse_avg_pool3d(f, *args, mask_in=x.layout(), mask_out=x.layout(shape),
                                               backend=self.backend))


class _SparseNorm(_SparseMixin):
    """Shared entry of the norm twins: plain tensor or nothing masked -> exactly the dense norm; otherwise
    ``_sparse`` normalises over visible voxels and returns the result in the input's form (compact/dense)."""

    def _dense(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(t)  # the dense class follows this mixin in the MRO

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return self._dense(x)
        if x.layout().all_active and not x.is_compact:
            return x.replace(self._dense(x.features))
        return x.like(self._sparse(x))

    def _sparse(self, x: SparseTensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class SparseBatchNorm3d(_SparseNorm, nn.BatchNorm3d):
    """BatchNorm3d whose statistics use visible voxels only (SparK's SparseBatchNorm without gathering)."""

    def _sparse(self, x):
        training = self.training or self.running_mean is None
        track = self.training and self.track_running_stats
        stats = track or not self.training
        return ops.sparse_batch_norm(x.storage, x.layout(), self.running_mean if stats else None,
                                     self.running_var if stats else None, self.weight, self.bias, training,
                                     self.momentum, self.eps, self.num_batches_tracked if track else None,
                                     backend=self.backend, masked_input=True, compact=x.is_compact)


class SparseInstanceNorm3d(_SparseNorm, nn.InstanceNorm3d):
    def _sparse(self, x):
        use_input_stats = self.training or not self.track_running_stats
        if x.is_compact and self.running_mean is None and use_input_stats:
            return ops.sparse_instance_norm(x.compact, x.layout(), None, None, self.weight, self.bias, True, 0.1,
                                            self.eps, compact=True)
        return ops.sparse_instance_norm(x.features, x.layout(), self.running_mean, self.running_var, self.weight,
                                        self.bias, use_input_stats, self.momentum if self.momentum is not None
                                        else 0.1, self.eps, backend=self.backend, masked_input=True)


class SparseGroupNorm(_SparseNorm, nn.GroupNorm):
    def _sparse(self, x):
        return ops.sparse_group_norm(x.storage, x.layout(), self.num_groups, self.weight, self.bias, self.eps,
                                     backend=self.backend, masked_input=True, compact=x.is_compact)


class SparseLayerNormCF(_SparseNorm, LayerNormCF):
    def _sparse(self, x):
        if x.is_compact:  # normalises each voxel over channels: the dense op on visible cells, no re-masking
            return self._dense(x.compact)
        return ops.sparse_layer_norm_cf(x.features, x.layout(), self.weight, self.bias, self.eps,
                                        backend=self.backend)


# ----------------------------------------------------------------------------- pointwise (parameter-free or
# per-channel) modules: applied to the features; re-masked unless f(0) == 0 is known.
ZERO_PRESERVING = ("ReLU", "LeakyReLU", "GELU", "SiLU", "ELU", "Tanh", "Hardswish", "Mish", "PReLU", "ReLU6",
                   "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Identity", "DropPath",
                   "Softsign", "Tanhshrink", "Hardtanh", "SELU", "CELU", "Softshrink", "Hardshrink")


class SparsePointwise(_SparseMixin):
    """Mixin for elementwise modules; combined with the dense class by ``pointwise_class``."""

    zero_preserving: bool = True

    def forward(self, x):
        dense_forward = super().forward  # the dense class follows this mixin in the MRO
        if not isinstance(x, SparseTensor):
            return dense_forward(x)
        y = dense_forward(x.storage)
        if not self.zero_preserving and not x.is_compact:  # compact storage holds visible voxels only
            y = y * x.layout().float_mask(y.dtype)
        return x.like(y)


_POINTWISE_CLASSES: dict[type, type] = {}


def pointwise_class(cls: type) -> type:
    """The sparse subclass of an elementwise module class (created once and cached)."""
    sub = _POINTWISE_CLASSES.get(cls)
    if sub is None:
        sub = type("Sparse" + cls.__name__, (SparsePointwise, cls),
                   {"zero_preserving": cls.__name__ in ZERO_PRESERVING, "__module__": __name__})
        _POINTWISE_CLASSES[cls] = sub
    return sub


__all__ = ["SparseConv3d", "SparseConvTranspose3d", "SparseMaxPool3d", "SparseAvgPool3d", "SparseBatchNorm3d",
           "SparseInstanceNorm3d", "SparseGroupNorm", "SparseLayerNormCF", "SparsePointwise", "pointwise_class",
           "ZERO_PRESERVING"]
