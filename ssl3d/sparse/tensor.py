"""Mask layouts (one per feature resolution) and the ``SparseTensor`` container modules pass along.

A ``SparseTensor`` is a dense feature map ``(B, C, D, H, W)`` that is zero at masked voxels, plus a shared
``MaskCache`` that knows the boolean cell grid ``(B, gz, gy, gx)`` and derives (and caches) a ``Layout``
for every resolution an op asks for. Because the mask travels with the features, unmodified container
modules (nn.Sequential, dynamic-network-architectures blocks) propagate it without knowing about it.
"""
from __future__ import annotations

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
    """Features ``(B, C, D, H, W)`` (zero where masked) travelling with their mask.

    Sparse modules accept either a plain tensor (they then act exactly like their dense twin) or a
    SparseTensor (they compute on visible voxels only and return a SparseTensor). Arithmetic needed by
    residual blocks (``+``, ``+=``, scalar ``*``) is supported; use ``.features`` to get the tensor.
    """

    __slots__ = ("features", "masks")

    def __init__(self, features: torch.Tensor, mask: "torch.Tensor | MaskCache"):
        self.features = features
        self.masks = mask if isinstance(mask, MaskCache) else MaskCache(mask.to(features.device))

    @classmethod
    def from_dense(cls, x: torch.Tensor, cells: torch.Tensor) -> "SparseTensor":
        """Wrap an input and zero its masked voxels (so the invariant holds from the start)."""
        st = cls(x, cells)
        return st.replace(x * st.layout().float_mask(x.dtype))

    def layout(self, shape: Sequence[int] | None = None) -> Layout:
        return self.masks.layout(self.features.shape[2:] if shape is None else shape)

    @property
    def mask(self) -> torch.Tensor:
        """Bool mask ``(B, D, H, W)`` at this tensor's resolution."""
        return self.layout().mask

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        return SparseTensor(features, self.masks)

    # tensor-like conveniences used by container modules
    @property
    def shape(self) -> torch.Size:
        return self.features.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def device(self) -> torch.device:
        return self.features.device

    def dim(self) -> int:
        return self.features.dim()

    def size(self, *a: int):
        return self.features.size(*a)

    @staticmethod
    def _f(o: Any) -> Any:
        return o.features if isinstance(o, SparseTensor) else o

    def __add__(self, other: Any) -> "SparseTensor":
        return self.replace(self.features + self._f(other))

    __radd__ = __add__

    def __iadd__(self, other: Any) -> "SparseTensor":
        self.features += self._f(other)
        return self

    def __mul__(self, other: Any) -> "SparseTensor":
        o = self._f(other)
        if isinstance(o, torch.Tensor) and o.numel() > self.features.shape[1]:
            raise TypeError("only scalar or per-channel factors keep masked voxels at zero")
        return self.replace(self.features * self._f(other))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return (f"SparseTensor(shape={tuple(self.features.shape)}, visible="
                f"{self.layout().active_fraction:.3f}, dtype={self.features.dtype})")


def unwrap(x: "torch.Tensor | SparseTensor") -> tuple[torch.Tensor, MaskCache | None]:
    if isinstance(x, SparseTensor):
        return x.features, x.masks
    return x, None


__all__ = ["Layout", "MaskCache", "SparseTensor", "as_layout", "unwrap"]
