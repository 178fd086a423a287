"""Masked sparse 3D convolution for masked-image-modeling pretraining (SparK / HySparK style).

What to import::

    from ssl3d.sparse import (random_cell_mask, mask_pyramid, upsample_mask, bottom_up_masks,
                              visible_token_indices, SparseTensor, sparsify, sparse_forward)

Masks: a boolean *cell grid* ``(B, gz, gy, gx)``, True = visible, one mask per sample (``random_cell_mask``
draws exactly ``round(ratio * n_cells)`` masked cells per sample, seeded by a ``torch.Generator``). The mask
at any resolution is its nearest-neighbour upsampling (``upsample_mask``); ``mask_pyramid`` lists it for
every stage of an encoder, ``bottom_up_masks`` draws HySparK masks on the ViT junction grid and maps them up,
``visible_token_indices`` gives the per-sample visible-token indices (exact per-sample counts).

Building a sparse encoder (parameters shared with the dense one, identical state_dict)::

    dense = ResidualEncoder(...)            # dynamic_network_architectures, or ssl3d.architectures.mednext
    enc = sparsify(dense)                   # sparse twin; dense.load_state_dict(enc.state_dict()) just works
    cells = random_cell_mask(B, grid, 0.75, generator=g, device=x.device)   # grid = input_shape // cell
    skips = sparse_forward(enc, x, cells)   # same output structure as dense(x), masked voxels are 0
    skips_dense = enc(x)                    # plain tensor in → exactly the dense network

How the mask flows: ``sparse_forward`` wraps ``x`` into ``SparseTensor.from_dense(x, cells)`` — the features
(zeroed where masked) plus a shared ``MaskCache`` holding the cell grid. Every sparse leaf module
(``SparseConv3d``, ``SparseMaxPool3d``, ``SparseAvgPool3d``, ``SparseConvTranspose3d``, ``SparseBatchNorm3d``,
``SparseInstanceNorm3d``, ``SparseGroupNorm``, ``SparseLayerNormCF``, and the elementwise nonlinearities /
dropouts) reads the mask it needs at its input and output resolution from the tensor (``x.layout(shape)``,
cached per resolution, so anisotropic and strided stages need no configuration) and returns a SparseTensor.
Containers (nn.Sequential, dna's BasicBlockD with its pooled skip, StackedResidualBlocks, the stem,
MedNeXt blocks) run their usual forward; residual ``+`` / ``+=`` work on SparseTensor. Where the blocked
CPU convolution runs, features stay *compact* (only the visible cells, ``(N, C, *cell)``) until a module
needs the dense form (``.features``), so the elementwise work and saved activations shrink with the mask. Call the model
directly with a SparseTensor to get SparseTensors back (``.features``, ``.mask`` at that stage resolution).

Semantics: every op equals its reference ``dense_op(x * m_in) * m_out`` (+ bias only at visible outputs;
norm statistics over visible voxels only); a masked voxel never influences a visible output.

Backends (``sparsify(model, backend=...)``, ``set_backend(model, ...)`` or the functional ``backend=``):
"reference" (dense conv on the masked input), "gather" (alias "cpu": gather visible cells + halo, dense conv
of the stack, custom autograd; pure torch, so CPU or cuDNN on CUDA), "triton" (implicit-GEMM kernels over
active-tile lists, CUDA; CPU via TRITON_INTERPRET=1; raises where Triton cannot run), "auto" (dense at 0 %
masking; "gather" where its cost model predicts a win, else "reference"; Triton only for layer signatures
whose first-use check on this device passed, see ``ssl3d.sparse.dispatch`` and ``SSL3D_SPARSE_CACHE``).
Each distinct layer signature logs its backend once (INFO, logger ``ssl3d.sparse.dispatch``). Under
``torch.autocast`` the sparse convs cast like ``conv3d`` and the masked norms keep their input's dtype
(``ssl3d.sparse.amp``).
Functional ops: ``ssl3d.sparse.ops`` (``sparse_conv3d`` etc.), definitions in ``ssl3d.sparse.reference``.
"""
from .convert import set_backend, sparse_forward, sparsify
from .masks import (BottomUpMasks, VisibleTokens, bottom_up_masks, mask_pyramid, mask_ratio, random_cell_mask,
                    upsample_mask, visible_token_indices)
from .modules import (SparseAvgPool3d, SparseBatchNorm3d, SparseConv3d, SparseConvTranspose3d, SparseGroupNorm,
                      SparseInstanceNorm3d, SparseLayerNormCF, SparseMaxPool3d)
from .ops import (sparse_avg_pool3d, sparse_batch_norm, sparse_conv3d, sparse_conv_transpose3d,
                  sparse_group_norm, sparse_instance_norm, sparse_layer_norm_cf, sparse_max_pool3d)
from .tensor import Layout, MaskCache, SparseTensor

__all__ = [
    "random_cell_mask", "upsample_mask", "mask_pyramid", "bottom_up_masks", "BottomUpMasks",
    "visible_token_indices", "VisibleTokens", "mask_ratio",
    "SparseTensor", "Layout", "MaskCache",
    "sparsify", "set_backend", "sparse_forward",
    "SparseConv3d", "SparseConvTranspose3d", "SparseMaxPool3d", "SparseAvgPool3d", "SparseBatchNorm3d",
    "SparseInstanceNorm3d", "SparseGroupNorm", "SparseLayerNormCF",
    "sparse_conv3d", "sparse_conv_transpose3d", "sparse_max_pool3d", "sparse_avg_pool3d", "sparse_batch_norm",
    "sparse_instance_norm", "sparse_group_norm", "sparse_layer_norm_cf",
]
