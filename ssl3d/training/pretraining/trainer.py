"""``SSLPretrainer``: nnU-Net's trainer with the parts that do not fit unlabeled data replaced through its hooks.

Kept from ``nnUNetTrainer``: the training loop (``run_training``), results folder layout, text log,
``progress.png``, checkpoint_latest/best/final and ``--c`` resume, plans/dataset.json/fingerprint copies,
CPU/CUDA devices, DDP. Replaced hooks: the network (an SSL method from the
registry), the loss (inside the method), data loading (random crops of the planned patch, mirroring, no label
oversampling, seeded workers), the train/validation steps (masks drawn per step and passed explicitly;
validation = reconstruction loss on held-out cases with fixed masks), per-iteration warm-up + cosine AdamW
with the method's own defaults, and epoch-end bookkeeping (best = lowest validation loss, kept in
``best_val_loss``). DDP also works under ``torchrun`` and with gloo on CPU.

Memory/precision options (attributes): ``amp`` ("bf16", "fp16", "off"; None = bf16 on GPUs that support it,
else fp16, off on CPU) resolved in ``initialize`` to ``amp_dtype``, with nnU-Net's ``grad_scaler`` kept for fp16
only; ``grad_accum`` N splits each step's batch (masks drawn for the whole batch) into N micro-batches whose
losses are weighted by their share of the batch, so one step equals the step on the whole batch for
per-sample losses; DDP syncs gradients on the last micro-batch only; the schedule counts optimizer steps.
``checkpoint_activations`` recomputes the method's encoder/decoder stages in backward.
"""
from __future__ import annotations

import os
import shutil
from time import time

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from torch import autocast
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from ssl3d.training.checkpoints import CheckpointExtrasMixin
from ssl3d.training.methods import MethodSpec, SSLMethod, get_method_spec
from ssl3d.training.optim import WarmupCosine, backward, clip_and_step, param_groups, resolve_amp
from ssl3d.training.pretraining.previews import save_reconstruction_preview
from ssl3d.training.pretraining.views import TwoViewDataLoader, contrastive_view_transforms
from ssl3d.training.seeding import derive_seed, seed_everything, worker_seeds
from ssl3d.training.stepwise import StepwiseScheduleMixin
from ssl3d.training.trainer_init import TrainerInitMixin
from ssl3d.utils import DEFAULT_SEED, DiesWithParent, unwrap_network, write_json

COLLAPSE_STD = 1e-3  # per-dimension std of L2-normalized embeddings; ~1/sqrt(dim) when spread, 0 when collapsed


class SSLPretrainer(StepwiseScheduleMixin, CheckpointExtrasMixin, TrainerInitMixin, nnUNetTrainer):
    """Runs the registered method ``method_name``; options are attributes set after construction (nnU-Net
    convention). Registry methods get a named subclass each from :func:`pretrainer_class`."""

    method_name = ""

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        optim = self.method_spec.optim
        ssl = self.configuration_manager.configuration.get("ssl3d", {})
        # the method's paper ratio (MiM 60 %, SMIT 70 %) unless it has none; ssl_pretrain --mask-ratio overrides
        spec_ratio = self.method_spec.mask_ratio
        self.mask_ratio = float(spec_ratio if spec_ratio is not None else ssl.get("mask_ratio", 0.75))
        self.method_kwargs: dict = {}
        self.sparse_backend = "auto"
        self.amp: str | None = None  # "bf16" | "fp16" | "off"; None: the device's default (see resolve_amp)
        self.amp_dtype: torch.dtype | None = None  # resolved in initialize
        self.grad_accum = 1  # micro-batches per optimizer step (the batch is split)
        self.checkpoint_activations = False
        self.weight_decay = optim.weight_decay
        self.betas = tuple(optim.betas)
        self.warmup_fraction = optim.warmup_fraction
        self.grad_clip = optim.grad_clip
        self.num_epochs = 1000
        self.num_iterations_per_epoch = 250
        self.num_val_iterations_per_epoch = 10
        self.save_every = 10
        self.preview_every = 10
        self.val_fraction = 0.05
        self.oversample_foreground_percent = 0.0
        self.enable_deep_supervision = False
        self.seed = DEFAULT_SEED  # masks, init, data order and augmentation derive from it
        self.global_step = 0
        self.show_progress = True
        self.best_val_loss: float | None = None
        self.epoch_stats: dict[str, float] = {}
        self.initial_lr = None  # -> the method's default for the global batch size in configure_optimizers
        self._bar = None

    @property
    def method_spec(self) -> MethodSpec:
        return get_method_spec(self.method_name)

    # ---- network, optimizer --------------------------------------------------------------------------------
    def build_ssl_network(self) -> SSLMethod:
        kwargs = dict(self.method_kwargs)
        if self.method_spec.sparse:
            kwargs.setdefault("backend", self.sparse_backend)
        return self.method_spec.build(self.plans_manager.plans, self.configuration_manager.configuration,
                                      self.num_input_channels, **kwargs)

    @property
    def ssl_method(self) -> SSLMethod:
        return unwrap_network(self.network)

    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize called twice")
        seed_everything(derive_seed(self.seed, "init"))  # same initial weights on every rank
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self._setup_memory_options()
        self.network = self.build_ssl_network().to(self.device)
        if self.checkpoint_activations:
            self.network.enable_activation_checkpointing()
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DDP(self.network, device_ids=ids)
        self.loss = None
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True

    def _setup_memory_options(self) -> None:
        """AMP dtype and grad scaler (fp16 only) from ``amp``; the micro-batch split must be exact."""
        self.amp_dtype = resolve_amp(self.amp, self.device)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.grad_accum = int(self.grad_accum)
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum {self.grad_accum} must be >= 1 and divide the batch per rank "
                             f"({self.batch_size})")

    def autocast_context(self):
        """The forward's autocast context (``amp_dtype``), or none."""
        if self.amp_dtype is None:
            return dummy_context()
        return autocast(self.device.type, dtype=self.amp_dtype)

    def _global_batch_size(self) -> int:
        return int(self.configuration_manager.batch_size)

    def configure_optimizers(self):
        if self.initial_lr is None:
            self.initial_lr = self.method_spec.optim.peak_lr(self._global_batch_size())
        optimizer = torch.optim.AdamW(param_groups(self.network, self.weight_decay), lr=self.initial_lr,
                                      betas=self.betas)
        total = self.num_epochs * self.num_iterations_per_epoch
        scheduler = WarmupCosine(optimizer, self.initial_lr, total, int(round(self.warmup_fraction * total)))
        return optimizer, scheduler

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # SSL networks have no deep supervision heads

    def plot_network_architecture(self):
        pass

    # ---- data ----------------------------------------------------------------------------------------------
    def do_split(self):
        """Fold 'all': every case trains and validates. Otherwise a seeded held-out fraction (at least one case)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        ids = sorted(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        if self.fold == "all" or len(ids) < 2:
            return ids, ids
        rng = np.random.RandomState(DEFAULT_SEED + int(self.fold))
        n_val = max(1, int(round(self.val_fraction * len(ids))))
        val = sorted(rng.choice(ids, n_val, replace=False).tolist())
        return [i for i in ids if i not in val], val

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch = self.ssl_method.data_patch_size  # the planned patch, or the larger region a method takes views from
        tr_keys, val_keys = self.do_split()
        ds_tr = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        ds_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        if self.ssl_method.n_views == 2:
            views = contrastive_view_transforms(patch)
            overlap = self.ssl_method.view_overlap
            dl_tr = TwoViewDataLoader(ds_tr, self.batch_size, patch, self.label_manager, overlap, views)
            dl_val = TwoViewDataLoader(ds_val, self.batch_size, patch, self.label_manager, overlap, views)
        else:
            mirror = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1, 2))])
            dl_tr = nnUNetDataLoader(ds_tr, self.batch_size, patch, patch, self.label_manager,
                                     oversample_foreground_percent=self.oversample_foreground_percent,
                                     transforms=mirror)
            dl_val = nnUNetDataLoader(ds_val, self.batch_size, patch, patch, self.label_manager,
                                      oversample_foreground_percent=0.0, transforms=None)
        seed_everything(derive_seed(self.seed, "data", self.local_rank))  # single-threaded loading
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        pin = self.device.type == "cuda"
        n_val = max(1, n_proc // 2)
        return (NonDetMultiThreadedAugmenter(DiesWithParent(dl_tr), None, n_proc, max(6, n_proc // 2),
                                             worker_seeds(self.seed, self.local_rank, "train", n_proc), pin, 0.002),
                NonDetMultiThreadedAugmenter(DiesWithParent(dl_val), None, n_val, max(3, n_proc // 4),
                                             worker_seeds(self.seed, self.local_rank, "val", n_val), pin, 0.002))

    def _generator(self, stream: int, index: int) -> torch.Generator:
        """Seeded per (stream, step, rank): resumable, different on every rank, fixed for validation."""
        return torch.Generator().manual_seed(derive_seed(self.seed, stream, index, self.local_rank))

    def _masks(self, data: torch.Tensor, stream: int, index: int) -> torch.Tensor:
        """Masks on the network-input grid (the method's ``patch_size``)."""
        return self.ssl_method.random_mask(data.shape[0], self.mask_ratio, self._generator(stream, index),
                                           data.device)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_json(os.path.join(self.output_folder_base, "ssl_method.json"),
                       {**self.ssl_method.config(), "mask_ratio": self.mask_ratio, "trainer": type(self).__name__,
                        "initial_lr": self.initial_lr, "weight_decay": self.weight_decay, "betas": self.betas,
                        "grad_clip": self.grad_clip, "seed": self.seed,
                        "batch_size": self._global_batch_size(), "num_epochs": self.num_epochs,
                        "num_iterations_per_epoch": self.num_iterations_per_epoch,
                        "sparse_backend": self.sparse_backend, "method_kwargs": self.method_kwargs,
                        "amp": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off",
                        "grad_accum": self.grad_accum, "checkpoint_activations": self.checkpoint_activations,
                        "downstream_architecture": self._downstream_architecture()})
            # folds may differ (--size, --patch-size): each keeps its own description, read before the shared one
            for name in ("ssl_method.json", "plans.json"):
                shutil.copyfile(os.path.join(self.output_folder_base, name), os.path.join(self.output_folder, name))

    def print_plans(self):
        """nnU-Net prints the planned configuration (its architecture is the planned ResEnc); say what is built."""
        super().print_plans()
        if self.local_rank == 0:
            self.print_to_log_file(self.built_network_line(), add_timestamp=False)

    def built_network_line(self) -> str:
        """The network this run really trains (method, --size, parameters) and the one fine-tuning receives."""
        net = self.ssl_method
        n_params = sum(p.numel() for p in net.parameters())
        size = (self.method_kwargs or {}).get("size", "planned")
        line = f"network built: {self.method_spec.name} ({type(net).__name__}), size {size}, {n_params:,} parameters"
        arch = self._downstream_architecture()
        if arch:
            kw = arch.get("arch_kwargs", {})
            line += f"; downstream {arch['network_class_name'].rsplit('.', 1)[-1]}"
            for key in ("n_stages", "features_per_stage", "strides"):
                if key in kw:
                    line += f", {key} {kw[key]}"
        return line + " (this, not the planned architecture above)"

    def _downstream_architecture(self) -> dict | None:
        try:
            return self.ssl_method.downstream_architecture()
        except NotImplementedError:
            return None

    def trained_parameters(self):
        """Everything the optimizer steps (clipped together)."""
        return self.network.parameters()

    def compute_loss(self, data: torch.Tensor, visible: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One training loss; ``generator`` serves the method's other random draws (views, nested crops)."""
        return self.network(data, visible, generator=generator)

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def train_step(self, batch: dict) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches of the batch (masks drawn for the whole batch)."""
        data = batch["data"].to(self.device, non_blocking=True)
        visible = self._masks(data, 0, self.global_step)
        self.ssl_method.set_progress(self.global_step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        generator = self._generator(4, self.global_step)
        n = self.grad_accum
        total = torch.zeros((), device=self.device)
        stats: list[dict] = []
        for i, (d, v) in enumerate(zip(data.tensor_split(n), visible.tensor_split(n))):
            sync = i == n - 1 or not self.is_ddp  # DDP all-reduces the accumulated gradients once, at the last
            with dummy_context() if sync else self.network.no_sync():
                with self.autocast_context():
                    loss = self.compute_loss(d, v, generator)
                    if n > 1:
                        loss = loss * (d.shape[0] / data.shape[0])
                backward(loss, self.grad_scaler)
            total += loss.detach().float()
            stats.append(dict(self.ssl_method.stats))
        clip_and_step(self.optimizer, self.trained_parameters(), self.grad_clip, self.grad_scaler)
        self.after_optimizer_step()
        value = total.cpu().numpy()
        self.advance_step(float(value))
        return {"loss": value, **{k: float(np.mean([s[k] for s in stats if k in s])) for k in stats[-1]}}

    def after_optimizer_step(self) -> None:
        """EMA teachers and the like (runs identically on every rank after the step)."""
        self.ssl_method.after_optimizer_step()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        self.close_bar()
        self.log_method_stats(train_outputs)
        super().on_train_epoch_end([{"loss": o["loss"]} for o in train_outputs])

    def log_method_stats(self, train_outputs: list[dict]) -> None:
        """Epoch means of the method's diagnostics (e.g. embedding std, teacher entropy) into the text log, with a
        warning when embeddings collapse (all equal: per-dimension std ~ 0)."""
        keys = sorted({k for o in train_outputs for k in o if k != "loss"})
        if not keys:
            return
        means = {k: float(np.mean([o[k] for o in train_outputs if k in o])) for k in keys}
        self.epoch_stats = means
        self.print_to_log_file("method stats: " + ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
        collapsed = [k for k, v in means.items() if k.endswith("embedding_std") and v < COLLAPSE_STD]
        if collapsed:
            self.print_to_log_file(f"WARNING: representation collapse suspected ({', '.join(collapsed)} < "
                                   f"{COLLAPSE_STD})")

    def on_validation_epoch_start(self):
        self.network.eval()
        self._val_index = 0

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        visible = self._masks(data, 1, self._val_index)
        g = self._generator(5, self._val_index)
        self._val_index += 1
        with self.autocast_context():
            loss = self.network(data, visible, generator=g)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, loss)
            loss = float(np.mean(gathered))
        self.logger.log("val_losses", loss, self.current_epoch)
        # nnU-Net's logger and progress plot expect Dice entries every epoch; there is no Dice here
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float("nan")], self.current_epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        tr = self.logger.get_value("train_losses", step=-1)
        val = self.logger.get_value("val_losses", step=-1)
        took = self.logger.get_value("epoch_end_timestamps", -1) - self.logger.get_value("epoch_start_timestamps", -1)
        self.print_to_log_file(f"train_loss {tr:.4f}  val_loss {val:.4f}  epoch time {took:.1f} s")
        epoch = self.current_epoch
        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.best_val_loss is None or val < self.best_val_loss:
            self.best_val_loss = val
            self.print_to_log_file(f"New best validation loss: {val:.4f}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            due = epoch == 0 or (epoch + 1) % self.preview_every == 0 or epoch == self.num_epochs - 1 \
                if self.preview_every else False
            if due and self.ssl_method.reconstructs:
                self.save_preview(os.path.join(self.output_folder, "previews", f"epoch_{epoch:04d}.png"))
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def checkpoint_extras(self) -> dict:
        return {"best_val_loss": self.best_val_loss, "global_step": self.global_step}

    def load_checkpoint_extras(self, extras: dict) -> None:
        self.best_val_loss = extras.get("best_val_loss")

    def save_preview(self, path: str) -> None:
        from ssl3d.sparse import upsample_mask

        batch = next(self.dataloader_val)
        data = self.ssl_method.input_view(batch["data"][:1].to(self.device))
        visible = self._masks(data, 2, self.current_epoch)
        was_training = self.network.training
        self.network.eval()
        recon = self.ssl_method.reconstruct(data, visible)
        self.network.train(was_training)
        vox = upsample_mask(visible, data.shape[2:])[0]
        save_reconstruction_preview(data[0, 0].float().cpu().numpy(), vox.cpu().numpy(),
                                    recon[0, 0].float().cpu().numpy(), path,
                                    f"{self.method_name} epoch {self.current_epoch}")

    def on_train_end(self):
        if self.local_rank == 0 and self.num_val_iterations_per_epoch > 0 and self.ssl_method.reconstructs:
            quality = self.reconstruction_quality()
            write_json(os.path.join(self.output_folder, "reconstruction_quality.json"), quality)
            self.print_to_log_file(
                f"reconstruction of masked voxels on held-out cases: PSNR {quality['psnr']:.2f} dB, SSIM "
                f"{quality['ssim']:.3f} (visible-mean baseline: {quality['baseline_psnr']:.2f} dB, "
                f"{quality['baseline_ssim']:.3f})")
        super().on_train_end()

    @torch.no_grad()
    def reconstruction_quality(self, batches: int | None = None) -> dict:
        """Masked-voxel PSNR/SSIM of the reconstruction on validation batches with fixed masks, next to the
        baseline that fills every masked voxel with the mean of the sample's visible voxels."""
        from ssl3d.sparse import upsample_mask
        from ssl3d.training.recon_metrics import masked_psnr, masked_ssim

        was_training = self.network.training
        self.network.eval()
        scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": []}
        for i in range(batches or self.num_val_iterations_per_epoch):
            data = self.ssl_method.input_view(next(self.dataloader_val)["data"].to(self.device))
            visible = self._masks(data, 3, i)
            recon = self.ssl_method.reconstruct(data, visible).float()
            masked = ~upsample_mask(visible, data.shape[2:])[:, None]
            vis_mean = (data * ~masked).sum((2, 3, 4), keepdim=True) / (~masked).sum((2, 3, 4), keepdim=True)
            baseline = torch.where(masked, vis_mean.expand_as(data), data)
            for key, pred in (("", recon), ("baseline_", baseline)):
                scores[f"{key}psnr"].append(masked_psnr(pred, data, masked))
                scores[f"{key}ssim"].append(masked_ssim(pred, data, masked))
        self.network.train(was_training)
        return {k: float(np.nanmean(v)) for k, v in scores.items()} | {"batches": len(scores["psnr"]),
                                                                       "mask_ratio": self.mask_ratio}

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining: no segmentation validation (reconstruction loss is logged per epoch).")


_CLASSES: dict[str, type] = {}


def pretrainer_class(method: str) -> type[SSLPretrainer]:
    """The pretrainer of a registered method: its own class if the spec names one, else a subclass of
    ``SSLPretrainer`` named ``spec.trainer_name`` (the results folder name), created once."""
    spec = get_method_spec(method)
    base = spec.pretrainer_base() or SSLPretrainer
    key = f"{method}:{spec.trainer_name}:{base.__qualname__}"
    if key not in _CLASSES:
        cls = base if getattr(base, "method_name", "") == method and base.__name__ == spec.trainer_name else \
            type(spec.trainer_name, (base,), {"method_name": method, "__module__": __name__})
        _CLASSES[key] = cls
    return _CLASSES[key]
