"""``SSLPretrainer``: nnU-Net's trainer with the parts that do not fit unlabeled data replaced.

Kept from ``nnUNetTrainer``: results folder layout, text log, ``progress.png``, checkpoint_latest/best/final
and ``--c`` resume, plans/dataset.json/fingerprint copies, CPU/CUDA devices, AMP + GradScaler on CUDA, DDP.
Replaced: the network (an SSL method from the registry), the loss (inside the method), data loading (random
crops of the planned patch, mirroring, no label oversampling), validation (reconstruction loss on held-out
cases with fixed masks), per-iteration warm-up + cosine AdamW, and epoch-end bookkeeping (best = lowest
validation loss). DDP also works under ``torchrun`` and with gloo on CPU.
"""
from __future__ import annotations

import os
import zlib
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
from tqdm import tqdm

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from ssl3d.training.methods import SSLMethod, build_method
from ssl3d.training.schedules import WarmupCosine, param_groups
from ssl3d.utils import write_json

REFERENCE_BATCH = 2
BASE_LR = 1e-4


class SSLPretrainer(nnUNetTrainer):
    """Subclasses set ``method_name``; options are attributes set after construction (nnU-Net convention)."""

    method_name = ""

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plans = dict(plans)
        plans.setdefault("continue_training", False)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":  # nnU-Net assumes NCCL on CUDA; gloo on CPU stays on CPU
            self.device = device
            self.grad_scaler = None
        ssl = self.configuration_manager.configuration.get("ssl3d", {})
        self.mask_ratio = float(ssl.get("mask_ratio", 0.75))
        self.method_kwargs: dict = {}
        self.sparse_backend = "auto"
        self.weight_decay = 0.05
        self.warmup_fraction = 0.05
        self.grad_clip = 3.0
        self.num_epochs = 1000
        self.num_iterations_per_epoch = 250
        self.num_val_iterations_per_epoch = 10
        self.save_every = 10
        self.preview_every = 10
        self.val_fraction = 0.05
        self.oversample_foreground_percent = 0.0
        self.enable_deep_supervision = False
        self.mask_seed = 12345
        self.global_step = 0
        self.show_progress = True
        self.initial_lr = None  # -> scaled from BASE_LR by the global batch size in configure_optimizers

    # ---- network, optimizer --------------------------------------------------------------------------------
    def build_ssl_network(self) -> SSLMethod:
        kwargs = dict(self.method_kwargs)
        if self.method_name in ("spark", "hyspark"):
            kwargs.setdefault("backend", self.sparse_backend)
        return build_method(self.method_name, self.plans_manager.plans, self.configuration_manager.configuration,
                            self.num_input_channels, **kwargs)

    @property
    def ssl_method(self) -> SSLMethod:
        net = self.network.module if isinstance(self.network, DDP) else self.network
        return getattr(net, "_orig_mod", net)

    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize called twice")
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_ssl_network().to(self.device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DDP(self.network, device_ids=ids)
        self.loss = None
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True

    def _global_batch_size(self) -> int:
        return int(self.configuration_manager.batch_size)

    def configure_optimizers(self):
        if self.initial_lr is None:
            self.initial_lr = min(1e-3, BASE_LR * self._global_batch_size() / REFERENCE_BATCH)
        optimizer = torch.optim.AdamW(param_groups(self.network, self.weight_decay), lr=self.initial_lr,
                                      betas=(0.9, 0.95))
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
        rng = np.random.RandomState(12345 + int(self.fold))
        n_val = max(1, int(round(self.val_fraction * len(ids))))
        val = sorted(rng.choice(ids, n_val, replace=False).tolist())
        return [i for i in ids if i not in val], val

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch = self.configuration_manager.patch_size
        tr_keys, val_keys = self.do_split()
        ds_tr = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        ds_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        mirror = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1, 2))])
        dl_tr = nnUNetDataLoader(ds_tr, self.batch_size, patch, patch, self.label_manager,
                                 oversample_foreground_percent=self.oversample_foreground_percent, transforms=mirror)
        dl_val = nnUNetDataLoader(ds_val, self.batch_size, patch, patch, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=None)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        pin = self.device.type == "cuda"
        return (NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002),
                NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None, pin, 0.002))

    def _masks(self, data: torch.Tensor, stream: int, index: int) -> torch.Tensor:
        """Seeded per (stream, step, rank): resumable, different on every rank, fixed for validation."""
        seed = zlib.crc32(f"{self.mask_seed}/{stream}/{index}/{self.local_rank}".encode())
        g = torch.Generator().manual_seed(seed)
        return self.ssl_method.random_mask(data.shape[0], self.mask_ratio, g, data.device, data.shape[2:])

    # ---- steps ---------------------------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_json(os.path.join(self.output_folder_base, "ssl_method.json"),
                       {**self.ssl_method.config(), "mask_ratio": self.mask_ratio, "trainer": type(self).__name__,
                        "initial_lr": self.initial_lr, "weight_decay": self.weight_decay,
                        "batch_size": self._global_batch_size(), "num_epochs": self.num_epochs,
                        "num_iterations_per_epoch": self.num_iterations_per_epoch,
                        "sparse_backend": self.sparse_backend, "method_kwargs": self.method_kwargs,
                        "downstream_architecture": self._downstream_architecture()})

    def _downstream_architecture(self) -> dict | None:
        try:
            return self.ssl_method.downstream_architecture()
        except NotImplementedError:
            return None

    def on_train_epoch_start(self):
        self.network.train()
        self.global_step = self.current_epoch * self.num_iterations_per_epoch
        lr = self.lr_scheduler.step(self.global_step)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {lr:.3g}")
        self.logger.log("lrs", lr, self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        visible = self._masks(data, 0, self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.network(data, visible)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        self.global_step += 1
        self.lr_scheduler.step(self.global_step)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_start(self):
        self.network.eval()
        self._val_index = 0

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        visible = self._masks(data, 1, self._val_index)
        self._val_index += 1
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.network(data, visible)
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
        if self._best_ema is None or val < self._best_ema:  # _best_ema holds the best validation loss here
            self._best_ema = val
            self.print_to_log_file(f"New best validation loss: {val:.4f}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            if self.preview_every and (epoch == 0 or (epoch + 1) % self.preview_every == 0
                                       or epoch == self.num_epochs - 1):
                self.save_preview(os.path.join(self.output_folder, "previews", f"epoch_{epoch:04d}.png"))
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def save_preview(self, path: str) -> None:
        from ssl3d.inference.previews import save_reconstruction_preview

        batch = next(self.dataloader_val)
        data = batch["data"][:1].to(self.device)
        visible = self._masks(data, 2, self.current_epoch)
        was_training = self.network.training
        self.network.eval()
        recon = self.ssl_method.reconstruct(data, visible)
        self.network.train(was_training)
        vox = visible.float()[:, None]
        vox = torch.nn.functional.interpolate(vox, size=data.shape[2:], mode="nearest")[0, 0].bool()
        save_reconstruction_preview(data[0, 0].float().cpu().numpy(), vox.cpu().numpy(),
                                    recon[0, 0].float().cpu().numpy(), path,
                                    f"{self.method_name} epoch {self.current_epoch}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining: no segmentation validation (reconstruction loss is logged per epoch).")

    def run_training(self):
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            bar = tqdm(range(self.num_iterations_per_epoch), desc=f"epoch {self.current_epoch}", unit="it",
                       disable=not self.show_progress or self.local_rank != 0, leave=False)
            for _ in bar:
                outputs.append(self.train_step(next(self.dataloader_train)))
                bar.set_postfix(loss=f"{float(outputs[-1]['loss']):.4f}")
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()


class MAEPretrainer(SSLPretrainer):
    method_name = "mae"


class SparKPretrainer(SSLPretrainer):
    method_name = "spark"


class HySparKPretrainer(SSLPretrainer):
    method_name = "hyspark"


PRETRAINERS = {c.method_name: c for c in (MAEPretrainer, SparKPretrainer, HySparKPretrainer)}

