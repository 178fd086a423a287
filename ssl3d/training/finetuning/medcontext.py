"""``MedContextTrainer``: segmentation with a masked-context consistency term and an EMA teacher.

Per step: the student segments the input and a masked copy (a fraction, default 40 %, of cells replaced by a
learnable mask token, a different mask per sample); an EMA teacher segments the input. Loss =
DiceCE(student(x)) + DiceCE(student(x_masked)) + β·‖Fs^M − Ft‖²/‖Ft‖² on the highest-resolution logits
(β = 0.5). The teacher momentum follows a cosine from 0.996 to 1 over the *global* step (epoch × iterations +
iteration); MedContext's public code indexes it by the batch index and shares one mask per batch.

Works with any architecture nnU-Net builds and with or without ``-pretrained_weights``. The mask token lives
with the network in one module (:class:`MaskedStudent`) so DDP averages and clips its gradient; checkpoints'
``network_weights`` and nnU-Net's predictor still see the plain network only; the token and the teacher are
stored as checkpoint extras. Options in ``configurations[c]["ssl3d_finetune"]`` (see :class:`MedContextOptions`):
``medcontext_ratio``, ``medcontext_beta``, ``medcontext_momentum``, ``medcontext_cell`` (voxels per cell, int or
three ints, default 16 like the paper's tokens, clipped to the patch) and ``medcontext_tube_axis`` (None, or
0/1/2: one 2D mask repeated through that spatial axis, the paper's depth-consistent masking).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import autocast, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from ssl3d.layers import Triple
from ssl3d.sparse.masks import random_cell_mask, upsample_mask
from ssl3d.training.checkpoints import CheckpointExtrasMixin
from ssl3d.training.distillation import ema_momentum, ema_update, frozen_copy
from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer
from ssl3d.training.optim import optimizer_step
from ssl3d.training.seeding import derive_seed, seed_everything
from ssl3d.utils import as_triple, unwrap_network

GRAD_CLIP = 12.0  # nnU-Net's value


@dataclass(frozen=True)
class MedContextOptions:
    ratio: float = 0.4
    beta: float = 0.5
    momentum: float = 0.996
    cell: Triple = (16, 16, 16)
    tube_axis: int | None = None

    @classmethod
    def from_plans(cls, ft: dict) -> "MedContextOptions":
        tube = ft.get("medcontext_tube_axis")
        opts = cls(float(ft.get("medcontext_ratio", cls.ratio)), float(ft.get("medcontext_beta", cls.beta)),
                   float(ft.get("medcontext_momentum", cls.momentum)), as_triple(ft.get("medcontext_cell", 16)),
                   None if tube is None else int(tube))
        if not 0.0 <= opts.ratio <= 1.0:
            raise ValueError(f"medcontext_ratio must be in [0, 1], got {opts.ratio}")
        if min(opts.cell) < 1:
            raise ValueError(f"medcontext_cell must be positive, got {opts.cell}")
        if opts.tube_axis not in (None, 0, 1, 2):
            raise ValueError(f"medcontext_tube_axis must be None, 0, 1 or 2, got {opts.tube_axis}")
        return opts


def relative_consistency(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """‖Fs − Ft‖² / ‖Ft‖² per sample (squared norms), averaged over the batch."""
    dims = tuple(range(1, student.dim()))
    num = (student.float() - teacher.float()).pow(2).sum(dims)
    den = teacher.float().pow(2).sum(dims).clamp(min=eps)
    return (num / den).mean()


def cell_grid(spatial: Sequence[int], cell: int | Sequence[int] = 16, tube_axis: int | None = None) -> Triple:
    """Cells per axis: whole cells of at least ``cell`` voxels (a cell larger than the patch is clipped to it, one
    cell); along ``tube_axis`` a single cell through the whole patch, so the 2D mask repeats along that axis."""
    grid = [max(1, int(s) // c) for s, c in zip(spatial, as_triple(cell))]
    if tube_axis is not None:
        grid[tube_axis] = 1
    return tuple(grid)  # type: ignore[return-value]


def draw_visible(batch: int, spatial: Sequence[int], opts: MedContextOptions,
                 generator: torch.Generator) -> torch.Tensor:
    """Per-sample cell masks ``(B, gz, gy, gx)``, True = visible, exactly ``round(ratio · cells)`` masked each."""
    return random_cell_mask(batch, cell_grid(spatial, opts.cell, opts.tube_axis), opts.ratio, generator)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Masks depend only on (seed, rank, global step): a resumed run draws the masks of the uninterrupted one."""
    return torch.Generator().manual_seed(derive_seed(seed, "medcontext", rank, step))


def apply_mask(x: torch.Tensor, visible: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Voxels of masked cells become ``token (C,)``; visible voxels are passed through unchanged."""
    keep = upsample_mask(visible.to(x.device), x.shape[2:])[:, None]
    return torch.where(keep, x, token.view(1, -1, 1, 1, 1).to(x.dtype))


def mask_cells(x: torch.Tensor, cell: int | Sequence[int], ratio: float, token: torch.Tensor,
               generator: torch.Generator, tube_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``ratio`` of the cells of every sample (own mask each) by ``token``. Returns (x_masked, visible)."""
    visible = random_cell_mask(x.shape[0], cell_grid(x.shape[2:], cell, tube_axis), ratio, generator)
    return apply_mask(x, visible, token), visible.to(x.device)


def _top(output: torch.Tensor | list | tuple) -> torch.Tensor:
    """Highest-resolution logits (deep supervision returns a list, finest first)."""
    return output[0] if isinstance(output, (list, tuple)) else output


class MaskedStudent(nn.Module):
    """The segmentation network plus the learnable mask token, as the one module that DDP wraps.

    Why not a token beside the network with a hand-written all-reduce: here DDP broadcasts the token at start,
    averages its gradient in the same bucketed all-reduce as the weights, and ``parameters()`` (clipping, the
    optimizer step) covers it; nothing can forget it. ``state_dict``/``load_state_dict`` are the plain network's,
    so nnU-Net's ``network_weights`` load strictly into the network the predictor builds from the plans.
    """

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.mask_token = nn.Parameter(torch.zeros(in_channels))

    @property
    def plain(self) -> nn.Module:
        """The network without ``torch.compile``'s wrapper (what owns the state_dict keys)."""
        return unwrap_network(self.net)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None):
        # one DDP forward computes both views, so every parameter (token included) is used once per backward
        if visible is None:
            return self.net(x)
        return self.net(x), self.net(apply_mask(x, visible, self.mask_token))

    def state_dict(self, *args, **kwargs):
        return self.plain.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.plain.load_state_dict(state_dict, strict=strict, assign=assign)


class MedContextTrainer(CheckpointExtrasMixin, SSLFinetuneTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.opts = MedContextOptions.from_plans(self.ft)
        self.teacher: nn.Module | None = None
        self.global_step = 0

    # ---- network: student (+ token) under DDP, plain network for nnU-Net's checkpoints and predictor ------------
    def initialize(self):
        """nnU-Net's ``initialize`` (which DDP-wraps the plain network with CUDA ``device_ids``) with the student
        wrapped before DDP; DDP also runs on CPU (gloo, no device_ids). nnU-Net's wandb hparams update is left out."""
        if self.was_initialized:
            raise RuntimeError("initialize called twice")
        seed_everything(derive_seed(self.seed, "init"))  # as SSLFinetuneTrainer: same initial weights per seed
        self._set_torch_threads()
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        net = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                              self.num_input_channels, self.label_manager.num_segmentation_heads,
                                              self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            net = torch.compile(net)
        self.network = MaskedStudent(net, self.num_input_channels).to(self.device)
        self._set_memory_format(net)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            cuda = self.device.type == "cuda"
            if cuda:  # SyncBatchNorm needs CUDA; on CPU DDP still broadcasts BN buffers
                self.network = nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
            self.network = DDP(self.network, device_ids=[self.device.index] if cuda else None)
        self.loss = self._build_loss()
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self._install_plot_hook()
        self.was_initialized = True

    def _student(self) -> MaskedStudent:
        return unwrap_network(self.network)

    def _network_module(self) -> nn.Module:
        return self._student().plain

    @property
    def mask_token(self) -> nn.Parameter:
        return self._student().mask_token

    def set_deep_supervision_enabled(self, enabled: bool):
        self._network_module().decoder.deep_supervision = enabled

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        optimizer.add_param_group({"params": [self.mask_token], "lr_factor": 1.0, "weight_decay": 0.0})
        return optimizer, scheduler

    # ---- teacher -----------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def _make_teacher(self) -> nn.Module:
        return frozen_copy(self._network_module()).eval()

    def update_teacher(self) -> float:
        """EMA after the optimizer step; the student is identical on every rank, so is the teacher."""
        m = ema_momentum(self.global_step, self.total_steps, self.opts.momentum)
        ema_update(self.teacher, self._network_module(), m)
        return m

    def on_train_start(self):
        super().on_train_start()
        # after -pretrained_weights / --c were loaded: the teacher starts from the student actually trained
        if self.teacher is None:
            self.teacher = self._make_teacher()
        self.print_to_log_file(f"MedContext: {self.opts}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.global_step = self.current_epoch * self.num_iterations_per_epoch

    # ---- step --------------------------------------------------------------------------------------------------
    def masks_for_step(self, batch: int, spatial: Sequence[int]) -> torch.Tensor:
        return draw_visible(batch, spatial, self.opts, step_generator(self.seed, self.local_rank, self.global_step))

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        visible = self.masks_for_step(data.shape[0], data.shape[2:]).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out, out_masked = self.network(data, visible)
            with torch.no_grad():
                out_teacher = self.teacher(data)
            l_cons = relative_consistency(_top(out_masked), _top(out_teacher))
            loss = self.loss(out, target) + self.loss(out_masked, target) + self.opts.beta * l_cons
        optimizer_step(loss, self.optimizer, self.network.parameters(), GRAD_CLIP, self.grad_scaler)
        self.update_teacher()
        self.global_step += 1
        return {"loss": loss.detach().cpu().numpy()}

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        if self.teacher is None:
            return {}
        return {"medcontext": {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
                               "mask_token": self.mask_token.detach().cpu()}}

    def load_checkpoint_extras(self, extras: dict) -> None:
        state = extras.get("medcontext")
        if state is None:
            return
        if self.teacher is None:
            self.teacher = self._make_teacher()
        self.teacher.load_state_dict(state["teacher"])
        with torch.no_grad():
            self.mask_token.copy_(state["mask_token"].to(self.mask_token.device))
