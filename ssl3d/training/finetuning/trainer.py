"""``SSLFinetuneTrainer``: nnU-Net's trainer for pretrained networks, found by stock nnU-Net via nnUNet_extTrainer.

Options live in the plans (``configurations[c]["ssl3d_finetune"]``, written by ``ssl_finetune``), because stock
``nnUNetv2_train`` constructs trainers with nnU-Net's five arguments only:

* ``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``: schedule (short variants);
* ``warmup_epochs`` and ``warmup``: ``"linear"`` LR warm-up, or ``"decoder"`` (encoder frozen, then linear);
* ``encoder_lr_factor``: encoder LR = factor × LR (e.g. 0.1), ``optimizer``: ``"auto"`` (AdamW for
  transformer encoders, nnU-Net's SGD otherwise), ``"sgd"`` or ``"adamw"``;
* ``n_train`` / ``fraction``: deterministic few-shot subset of the fold's training cases (never validation);
* ``final_validation``: False skips nnU-Net's sliding-window validation at the end (``ssl_finetune`` default on
  CPU); when it runs, every case's log line carries the count, elapsed time and ETA;
* ``seed``: initialisation, few-shot order, data order and augmentation workers seeded (reproducible runs);
* ``freeze_encoder``: the encoder stays exactly as loaded (frozen-encoder probe; see ``freeze.py``), only decoder
  and head train;
* ``checkpoints_at``: fractions of ``num_epochs`` (e.g. ``[0.25, 0.5]``) after which ``checkpoint_ep<E>.pth`` is
  written (atomically) for convergence curves; the final checkpoint is the 100 % point;
* speed on CPU (none changes the batches, the network or the loss): ``torch_threads`` (``"auto"``: the cores
  the augmentation workers leave free), ``plot_every`` (0: ``progress.png`` once at the end), ``save_best``
  (False: no ``checkpoint_best.pth`` on every pseudo-Dice improvement), ``channels_last`` (the network's 3-D
  convolution weights in ``channels_last_3d`` layout, which oneDNN runs faster on CPU; the same values, so the
  same function); see ``finetune_schedule.CPU_SPEED_OPTIONS``.

Transformer/single-output traits of the downstream network come from the method registry.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from ssl3d.training.checkpoints import AtomicCheckpointMixin
from ssl3d.training.finetune_schedule import checkpoint_epochs, free_cores_for_torch, intermediate_checkpoint_name
from ssl3d.training.finetuning.freeze import encoder_parameters, freeze_encoder_mode, set_encoder_trainable
from ssl3d.training.methods import spec_for_network
from ssl3d.training.seeding import derive_seed, seed_everything, seeded_nnunet_augmenters
from ssl3d.training.trainer_init import TrainerInitMixin
from ssl3d.utils import DEFAULT_SEED, unwrap_network


def few_shot_subset(train_keys: list[str], fold: int | str, n_train: int | None = None,
                    fraction: float | None = None, seed: int = DEFAULT_SEED) -> list[str]:
    """Deterministic subset of a fold's training cases: the first K of a permutation drawn from (seed, fold), so
    the same seed gives the same cases for every method and the sets are nested as K grows."""
    keys = sorted(train_keys)
    if n_train is None and fraction is None:
        return keys
    k = int(n_train) if n_train is not None else max(1, int(round(float(fraction) * len(keys))))
    if not 1 <= k <= len(keys):
        raise ValueError(f"few-shot size {k} must be between 1 and {len(keys)} training cases")
    order = np.random.RandomState(seed + (0 if fold == "all" else int(fold))).permutation(len(keys))
    return sorted(keys[i] for i in order[:k])


class WarmupPoly:
    """Linear warm-up over ``warmup`` epochs, then nnU-Net's poly decay; per-group LR factors kept."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, max_epochs: int, warmup: int):
        self.optimizer, self.base_lr, self.max_epochs, self.warmup = optimizer, base_lr, max_epochs, warmup

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.base_lr * (epoch + 1) / (self.warmup + 1)
        span = max(1, self.max_epochs - self.warmup)
        return self.base_lr * (1 - min(epoch - self.warmup, span - 1) / span) ** 0.9

    def step(self, epoch: int) -> None:
        lr = self.lr_at(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_factor", 1.0)


class SSLFinetuneTrainer(AtomicCheckpointMixin, TrainerInitMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ft = dict(self.configuration_manager.configuration.get("ssl3d_finetune", {}))
        self.num_epochs = int(self.ft.get("num_epochs", self.num_epochs))
        self.num_iterations_per_epoch = int(self.ft.get("num_iterations_per_epoch", self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = int(self.ft.get("num_val_iterations_per_epoch",
                                                            self.num_val_iterations_per_epoch))
        self.warmup_epochs = int(self.ft.get("warmup_epochs", max(1, self.num_epochs // 20)))
        self.warmup_mode = self.ft.get("warmup", "linear")
        self.encoder_lr_factor = float(self.ft.get("encoder_lr_factor", 1.0))
        self.save_every = int(self.ft.get("save_every", self.save_every))
        self.seed = int(self.ft.get("seed", DEFAULT_SEED))
        self.checkpoint_epochs = checkpoint_epochs(self.num_epochs, self.ft.get("checkpoints_at", []))
        self.plot_every = int(self.ft.get("plot_every", 1))
        self.save_best = bool(self.ft.get("save_best", True))
        self.torch_threads = self.ft.get("torch_threads")
        self.channels_last = bool(self.ft.get("channels_last", False))
        self.freeze_encoder = bool(self.ft.get("freeze_encoder", False))
        spec = spec_for_network(self.configuration_manager.network_arch_class_name)
        if spec is not None and spec.single_output:  # no multi-scale outputs: deep supervision off
            self.enable_deep_supervision = False
        transformer = spec is not None and spec.transformer
        self.use_adamw = self.ft.get("optimizer", "auto") == "adamw" or (
            self.ft.get("optimizer", "auto") == "auto" and transformer)
        if self.use_adamw:
            self.initial_lr = float(self.ft.get("lr", 3e-4))
            self.weight_decay = float(self.ft.get("weight_decay", 0.05))
        elif "lr" in self.ft:
            self.initial_lr = float(self.ft["lr"])

    def _network_module(self):
        return unwrap_network(self.network)

    def plot_network_architecture(self):
        pass  # nnU-Net's plot needs hiddenlayer (not installed, broken upstream): it would only log an ImportError

    def initialize(self):
        seed_everything(derive_seed(self.seed, "init"))  # same initial weights for the same seed
        self._set_torch_threads()
        super().initialize()
        self._install_plot_hook()
        self._set_memory_format(self._network_module())

    def _set_torch_threads(self) -> None:
        if self.torch_threads is not None and self.device.type == "cpu":
            # torch's default (all cores) oversubscribes the core the augmentation worker needs: on 2 cores with one
            # worker, 2 intra-op threads make forward/backward 2-4x slower than 1 (benchmarks/finetune_profile.py)
            from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

            n = self.torch_threads
            torch.set_num_threads(free_cores_for_torch(get_allowed_n_proc_DA()) if n == "auto" else int(n))
            self.print_to_log_file(f"torch intra-op threads: {torch.get_num_threads()}")

    def _install_plot_hook(self) -> None:
        """After nnU-Net's logger exists (subclasses with their own ``initialize`` call it too)."""
        self._plot_progress_png = self.logger.plot_progress_png
        if self.plot_every != 1:
            # nnU-Net redraws progress.png (matplotlib + seaborn, ~0.5-2 s on 2 cores) after every epoch of a few
            # iterations; drawing every plot_every-th epoch (0: at the end) plots the same logged values
            self.logger.plot_progress_png = self._maybe_plot_progress

    def _maybe_plot_progress(self, output_folder: str) -> None:
        if self.plot_every > 0 and (self.current_epoch + 1) % self.plot_every == 0:
            self._plot_progress_png(output_folder)

    def save_checkpoint(self, filename: str) -> None:
        # checkpoint_best (written on most epochs of a short run) is never read by the benchmark, which predicts
        # from checkpoint_final; skipping it saves a full network + optimizer write per epoch
        if not self.save_best and os.path.basename(filename) == "checkpoint_best.pth":
            return
        super().save_checkpoint(filename)

    def on_epoch_end(self):
        super().on_epoch_end()  # increments current_epoch
        done = self.current_epoch
        if done in self.checkpoint_epochs:
            self.current_epoch -= 1  # nnU-Net stores current_epoch + 1 (as in its on_train_end)
            self.save_checkpoint(os.path.join(self.output_folder, intermediate_checkpoint_name(done)))
            self.current_epoch += 1

    def on_train_end(self):
        super().on_train_end()
        if self.plot_every != 1 and self.local_rank == 0:
            self._plot_progress_png(self.output_folder)  # the full curve once

    def get_dataloaders(self):
        seed_everything(derive_seed(self.seed, "data", self.local_rank))
        with seeded_nnunet_augmenters(self.seed, self.local_rank):
            return super().get_dataloaders()

    def configure_optimizers(self):
        enc, rest = encoder_parameters(self._network_module())
        groups = [{"params": enc, "lr_factor": self.encoder_lr_factor}, {"params": rest, "lr_factor": 1.0}]
        if self.freeze_encoder:  # out of the optimizer: no update, no weight decay
            set_encoder_trainable(self._network_module(), False)
            groups = groups[1:]
        if self.use_adamw:
            opt = torch.optim.AdamW(groups, self.initial_lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                  nesterov=True)
        return opt, WarmupPoly(opt, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def on_train_epoch_start(self):
        frozen = self.warmup_mode == "decoder" and self.current_epoch < self.warmup_epochs
        set_encoder_trainable(self._network_module(), not (frozen or self.freeze_encoder))
        if frozen and not self.freeze_encoder:
            self.print_to_log_file("decoder-only warm-up: encoder frozen this epoch")
        super().on_train_epoch_start()  # network.train()
        if self.freeze_encoder:
            freeze_encoder_mode(self._network_module())

    def do_split(self):
        self._maybe_small_dataset_splits()
        tr, val = super().do_split()
        subset = few_shot_subset(list(tr), self.fold, self.ft.get("n_train"), self.ft.get("fraction"), self.seed)
        if len(subset) != len(tr):
            self.print_to_log_file(f"few-shot: training on {len(subset)} of {len(tr)} cases: {subset}")
        return subset, val

    def _maybe_small_dataset_splits(self) -> None:
        """nnU-Net's 5-fold split needs >= 5 cases; tiny labeled sets get leave-one-out folds instead."""
        from batchgenerators.utilities.file_and_folder_operations import save_json

        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits_file = os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold == "all" or os.path.isfile(splits_file):
            return
        ids = sorted(infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(
            self.preprocessed_dataset_folder))
        if 2 <= len(ids) < 5:
            self.print_to_log_file(f"only {len(ids)} cases: writing a {len(ids)}-fold (leave-one-out) split")
            save_json(generate_crossval_split(ids, seed=DEFAULT_SEED, n_splits=len(ids)), splits_file)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.ft.get("final_validation", True):
            self.print_to_log_file("final validation skipped (ssl3d_finetune.final_validation = false)")
            return None
        # nnU-Net logs "predicting <case>" per case and nothing else for minutes: add the count, elapsed and ETA
        n_cases, t0, seen = len(self.do_split()[1]), time.time(), [0]
        plain = self.print_to_log_file

        def with_progress(*args, **kwargs):
            if args and isinstance(args[0], str) and args[0].startswith("predicting "):
                seen[0] += 1
                el = time.time() - t0
                eta = f", ETA {el / (seen[0] - 1) * (n_cases - seen[0] + 1):.0f} s" if seen[0] > 1 else ""
                args = (f"final validation {seen[0]}/{n_cases} ({el:.0f} s{eta}): {args[0]}", *args[1:])
            return plain(*args, **kwargs)

        self.print_to_log_file = with_progress
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            del self.print_to_log_file
