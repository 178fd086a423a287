"""Mask layouts (one per feature resolution) and the ``SparseTensor`` container modules pass along.

A ``SparseTensor`` is a dense feature map ``(B, C, D, H, W)`` that is zero at masked voxels, plus a shared
``MaskCache`` that knows the boolean cell grid ``(B, gz, gy, gx)`` and derives (and caches) a ``Layout``
for every resolution an op asks for. Because the mask travels with the features, unmodified container
modules (nn.Sequential, dynamic-network-architectures blocks) propagate it without knowing about it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .masks import cell_size_of, upsample_mask


def _infer_cell_size(mask: torch.Tensor) -> tuple[int, int, int]:
    """Largest per-axis block size on which ``mask (B, D, H, W)`` is constant (1 if none larger)."""
    out = []
    for axis in range(3):
        n = mask.shape[axis + 1]
        best = 1
        for c in sorted((d for d in range(2, n + 1) if n % d == 0), reverse=True):
            shp = list(mask.shape)
            shp[axis + 1: axis + 2] = [n // c, c]
            v = mask.reshape(shp)
            first = v.narrow(axis + 2, 0, 1)
            if bool((v == first).all()):
                best = c
                break
        out.append(best)
    return tuple(out)  # type: ignore[return-value]


def cells_view(t: torch.Tensor, cell: Sequence[int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> view ``(B, gz, gy, gx, C, cz, cy, cx)`` (D, H, W multiples of ``cell``)."""
    b, c, d, h, w = t.shape
    return t.view(b, c, d // cell[0], cell[0], h // cell[1], cell[1], w // cell[2], cell[2]).permute(
        0, 2, 4, 6, 1, 3, 5, 7)


class Layout:
    """The mask at one resolution, with cached derived structures for the backends.

    ``mask`` is bool ``(B, D, H, W)``; ``cells`` the bool grid ``(B, gz, gy, gx)`` it repeats and
    ``cell_size`` the voxels per cell (so ``mask == upsample_mask(cells, mask.shape[1:])``).
    """

    def __init__(self, mask: torch.Tensor, cells: torch.Tensor | None = None,
                 cell_size: Sequence[int] | None = None):
        if mask.dim() == 5:
            mask = mask[:, 0]
        self.mask = mask.bool()
        if cells is None or cell_size is None:
            cell_size = _infer_cell_size(self.mask)
            cs = cell_size
            cells = self.mask[:, ::cs[0], ::cs[1], ::cs[2]]
        self.cells = cells.bool()
        self.cell_size = tuple(int(c) for c in cell_size)
        self.cache: dict[Any, Any] = {}  # backend plans keyed by op geometry

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape[1:])

    def float_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, 1, D, H, W)`` mask in ``dtype`` (cached)."""
        key = ("float", dtype)
        if key not in self.cache:
            self.cache[key] = self.mask[:, None].to(dtype)
        return self.cache[key]

    @property
    def active_cells(self) -> torch.Tensor:
        """``(N, 4)`` long: (b, z, y, x) of every visible cell."""
        if "active_cells" not in self.cache:
            self.cache["active_cells"] = self.cells.nonzero()
        return self.cache["active_cells"]

    @property
    def cell_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, z, y, x) index tensors of the visible cells, in ``active_cells`` order."""
        if "cell_index" not in self.cache:
            ac = self.active_cells
            self.cache["cell_index"] = tuple(ac[:, i].contiguous() for i in range(4))
        return self.cache["cell_index"]

    def to_compact(self, dense: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(N, C, *cell_size)``: the visible cells only (differentiable gather)."""
        return cells_view(dense, self.cell_size)[self.cell_index]

    def to_dense(self, compact: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of ``to_compact``: zeros at masked voxels (differentiable scatter)."""
        out = compact.new_zeros((batch, compact.shape[1], *self.shape))
        if compact.shape[0]:
            cells_view(out, self.cell_size)[self.cell_index] = compact
        return out

    @property
    def visible_per_sample(self) -> torch.Tensor:
        """``(B,)`` long: visible voxels of each sample at this resolution."""
        if "visible_per_sample" not in self.cache:
            counts = torch.bincount(self.cell_index[0], minlength=self.cells.shape[0])
            self.cache["visible_per_sample"] = counts * math.prod(self.cell_size)
        return self.cache["visible_per_sample"]

    @property
    def active_fraction(self) -> float:
        if "fraction" not in self.cache:
            self.cache["fraction"] = float(self.cells.float().mean().item()) if self.cells.numel() else 0.0
        return self.cache["fraction"]

    @property
    def all_active(self) -> bool:
        return self.active_fraction >= 1.0


def as_layout(mask: "Layout | torch.Tensor | None") -> Layout | None:
    """Accept a Layout, a bool/float mask ``(B, D, H, W)`` or ``(B, 1, D, H, W)``, or None."""
    if mask is None or isinstance(mask, Layout):
        return mask
    return Layout(mask)


class MaskCache:
    """A cell grid shared by all tensors derived from one masked input; builds a Layout per resolution."""

    def __init__(self, cells: torch.Tensor):
        if cells.dim() != 4:
            raise ValueError(f"cell mask must be (B, gz, gy, gx) bool, got shape {tuple(cells.shape)}")
        self.cells = cells.bool()
        self._layouts: dict[tuple[int, ...], Layout] = {}

    def layout(self, shape: Sequence[int]) -> Layout:
        shape = tuple(int(s) for s in shape)
        lay = self._layouts.get(shape)
        if lay is None:
            cs = cell_size_of(shape, self.cells.shape[1:])
            mask = upsample_mask(self.cells, shape)
            # cells smaller than a voxel (or misaligned): treat every voxel as its own cell
            lay = Layout(mask, self.cells, cs) if cs is not None else Layout(mask, mask, (1, 1, 1))
            self._layouts[shape] = lay
        return lay


class SparseTensor:
    """Features travelling with their mask, stored dense or compact.

    Dense: ``(B, C, D, H, W)``, zero at masked voxels. Compact: ``(N, C, *cell_size)``, only the N visible
    cells of this resolution's layout (what the blocked CPU convolution produces), so norms, activations and
    residual additions cost visible voxels only. Either form is derived from the other on demand.
    Sparse modules accept a plain tensor (they then act exactly like their dense twin) or a SparseTensor (they
    compute on visible voxels only and return a SparseTensor). Arithmetic needed by residual blocks (``+``,
    ``+=``, scalar ``*``) is supported; ``.features`` gives the dense tensor.
    """

    __slots__ = ("_dense", "_compact", "masks", "_shape")

    def __init__(self, features: torch.Tensor, mask: "torch.Tensor | MaskCache"):
        self._dense: torch.Tensor | None = features
        self._compact: torch.Tensor | None = None
        self._shape = tuple(features.shape)
        self.masks = mask if isinstance(mask, MaskCache) else MaskCache(mask.to(features.device))

    @classmethod
    def from_dense(cls, x: torch.Tensor, cells: torch.Tensor) -> "SparseTensor":
        """Wrap an input and zero its masked voxels (so the invariant holds from the start)."""
        st = cls(x, cells)
        return st.replace(x * st.layout().float_mask(x.dtype))

    @classmethod
    def from_compact(cls, compact: torch.Tensor, masks: MaskCache, shape: Sequence[int]) -> "SparseTensor":
        """Compact features of the layout of dense ``shape`` ``(B, C, D, H, W)``."""
        st = cls.__new__(cls)
        st._dense, st._compact, st.masks = None, compact, masks
        st._shape = (int(shape[0]), int(compact.shape[1]), *(int(s) for s in shape[2:]))
        return st

    def layout(self, shape: Sequence[int] | None = None) -> Layout:
        return self.masks.layout(self._shape[2:] if shape is None else shape)

    @property
    def features(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.layout().to_dense(self._compact, self._shape[0])
        return self._dense

    @property
    def compact(self) -> torch.Tensor:
        if self._compact is None:
            self._compact = self.layout().to_compact(self._dense)
        return self._compact

    @property
    def is_compact(self) -> bool:
        return self._dense is None

    @property
    def mask(self) -> torch.Tensor:
        """Bool mask ``(B, D, H, W)`` at this tensor's resolution."""
        return self.layout().mask

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        return SparseTensor(features, self.masks)

    def replace_compact(self, compact: torch.Tensor) -> "SparseTensor":
        return SparseTensor.from_compact(compact, self.masks, self._shape)

    @property
    def storage(self) -> torch.Tensor:
        """The tensor this one is held in: compact cells if compact, else the dense features."""
        return self._compact if self.is_compact else self._dense

    def like(self, t: torch.Tensor) -> "SparseTensor":
        """``t`` (same form and layout as ``storage``, channels may differ) wrapped like this tensor."""
        return self.replace_compact(t) if self.is_compact else self.replace(t)

    # tensor-like conveniences used by container modules
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def dim(self) -> int:
        return len(self._shape)

    def size(self, *a: int):
        return self.shape if not a else self.shape[a[0]]

    def _same_form(self, o: Any) -> tuple[torch.Tensor, Any, bool]:
        """This tensor's storage and ``o`` in the same form (compact when this one is compact)."""
        if isinstance(o, SparseTensor):
            if self.is_compact and o.layout() is self.layout():
                return self._compact, o.compact, True
            return self.features, o.features, False
        return self.storage, o, self.is_compact

    def _new(self, t: torch.Tensor, compact: bool) -> "SparseTensor":
        return self.replace_compact(t) if compact else self.replace(t)

    def __add__(self, other: Any) -> "SparseTensor":
        a, b, compact = self._same_form(other)
        return self._new(a + b, compact)

    __radd__ = __add__

    def __iadd__(self, other: Any) -> "SparseTensor":
        a, b, compact = self._same_form(other)
        a += b
        return self if compact == self.is_compact else self._new(a, compact)

    def __mul__(self, other: Any) -> "SparseTensor":
        if isinstance(other, SparseTensor) or (isinstance(other, torch.Tensor) and other.numel() > self._shape[1]):
            raise TypeError("only scalar or per-channel factors keep masked voxels at zero")
        a, b, compact = self._same_form(other)
        return self._new(a * b, compact)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return (f"SparseTensor(shape={self._shape}, visible={self.layout().active_fraction:.3f}, "
                f"{'compact' if self.is_compact else 'dense'}, dtype={self.dtype})")


def unwrap(x: "torch.Tensor | SparseTensor") -> tuple[torch.Tensor, MaskCache | None]:
    if isinstance(x, SparseTensor):
        return x.features, x.masks
    return x, None


__all__ = ["Layout", "MaskCache", "SparseTensor", "as_layout", "cells_view", "unwrap"]
