"""Case classification on top of a (pretrained) downstream encoder: ``ClassifierNet`` and its nnU-Net trainer.

Model: the method's downstream network built from the plans, reduced to its encoder
(:class:`~ssl3d.architectures.encoders.DownstreamEncoder`, pretrained weights copied by ``transfer_encoder``),
global average pooling of the deepest stage map, dropout (optional), one linear layer.

``SSLClassificationTrainer`` is nnU-Net's trainer changed through its hooks only, like ``SSLPretrainer``:
nnU-Net's loop, folders, log, ``progress.png``, checkpoint_latest/best/final and ``--c`` resume are kept;
replaced are the network, data loading (random crops of ``crop_size`` -- default the planned patch -- from
nnU-Net's loader, case classes looked up by the batch's keys; ``augment``: ``mirror`` on all axes, or ``nnunet``,
nnU-Net's own training transforms -- rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma,
mirroring -- from a larger loader crop as nnU-Net trains segmentation), the train step
(cross-entropy, optionally class-balanced, AdamW with per-iteration warm-up + cosine, encoder LR =
``encoder_lr_factor`` × LR, optional layer-wise decay ``layer_decay`` ** (depth from the top) over the encoder's
blocks) and epoch-end validation: every validation case is classified whole by a sliding window
(:func:`sliding_window_logits`: crop-size tiles, 50 % overlap, logits averaged over tiles -- and, for the final
held-out scoring (``predict_logits(tta=True)``), over the training mirrorings as nnU-Net predicts; a ``case`` crop,
:func:`resolve_crop`, holds every case in one tile); its AUC ("mean_fg_dice" in nnU-Net's log and plot) picks
``checkpoint_best`` (ties and undefined AUCs: lower validation loss). Without validation cases the epoch's
training loss decides. Mode ``scratch`` is the same network without pretrained weights. On CPU the network's
weights are in ``channels_last_3d`` layout (``channels_last``: the same function; oneDNN ran the tiny ResEnc's
training step 1.1x faster with 1 thread, 1.8x with 2 on the 2-core dev machine). Options are attributes set before
``initialize`` (nnU-Net convention); case lists and classes come from the caller.
"""
from __future__ import annotations

import itertools
import math
import os
import re
from time import time
from typing import Callable, Sequence

import numpy as np
import torch
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from torch import autocast, nn
from tqdm import tqdm

from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from ssl3d.architectures.encoders import DownstreamEncoder, avg_max_pool
from ssl3d.architectures.from_plans import build_network_from_plans, input_divisor
from ssl3d.training.checkpoints import CheckpointExtrasMixin
from ssl3d.training.export import transfer_encoder
from ssl3d.training.finetuning.cls_metrics import auc
from ssl3d.training.optim import WarmupCosine, optimizer_step, param_groups
from ssl3d.training.seeding import derive_seed, seed_everything
from ssl3d.training.stepwise import StepwiseScheduleMixin
from ssl3d.training.trainer_init import TrainerInitMixin
from ssl3d.utils import DEFAULT_SEED, BadInputError

MODES = ("finetune", "scratch", "linear")
TILE_STEP = 0.5
CROPS = ("patch", "case")
AUGMENTS = ("mirror", "nnunet")
CASE_CROP_MAX_VOXELS = 2 ** 21  # the planner's default patch budget (128^3): whole cases are for small volumes


def _round_up(shape: Sequence[int], multiple: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(m)) * int(m) for s, m in zip(shape, multiple))


def check_crop(crop: str, crop_size: Sequence[int] | None, architecture: dict, patch: Sequence[int]) -> None:
    """What can be refused before any work: an unknown ``crop``, an explicit ``crop_size`` the network cannot
    take (not a multiple of its input divisor; any shape but its fixed one for Primus-like networks) or any
    crop but the planned patch for a fixed-shape network."""
    if crop not in CROPS:
        raise BadInputError(None, f"--crop {crop}: choose {' or '.join(CROPS)}")
    if crop_size is not None and crop != "patch":
        raise BadInputError(None, "--crop-size and --crop case exclude each other")
    name = architecture["network_class_name"].rsplit(".", 1)[-1]
    div = input_divisor(architecture)
    if crop_size is not None:
        size = tuple(int(v) for v in crop_size)
        if len(size) != 3 or min(size) < 1:
            raise BadInputError(None, f"--crop-size {' '.join(map(str, size))}: expected 3 sizes of at least 1")
        if div is None and size != tuple(int(v) for v in patch):
            raise BadInputError(None, f"--crop-size {' '.join(map(str, size))}: {name} takes only its planned "
                                      f"patch {' '.join(map(str, patch))} (fixed token grid)")
        if div is not None and any(v % d for v, d in zip(size, div)):
            raise BadInputError(None, f"--crop-size {' '.join(map(str, size))}: {name} needs a multiple of "
                                      f"{' x '.join(map(str, div))} per axis (e.g. "
                                      f"{' '.join(map(str, _round_up(size, div)))})")
    elif crop == "case" and div is None:
        raise BadInputError(None, f"--crop case: {name} takes only its planned patch "
                                  f"{' '.join(map(str, patch))} (fixed token grid); use --crop patch")


def resolve_crop(crop: str, crop_size: Sequence[int] | None, architecture: dict, patch: Sequence[int],
                 shapes: Sequence[Sequence[int]] = ()) -> tuple[int, int, int]:
    """The training crop and scoring tile (after :func:`check_crop`): ``patch``: the planned patch; an explicit
    ``crop_size`` as given; ``case``: the per-axis maximum of the preprocessed ``shapes`` rounded up to a
    multiple of the network's input divisor (smaller cases are zero-padded as nnU-Net's loader pads), refused
    above ``CASE_CROP_MAX_VOXELS``."""
    check_crop(crop, crop_size, architecture, patch)
    if crop_size is not None:
        return tuple(int(v) for v in crop_size)  # type: ignore[return-value]
    if crop == "patch":
        return tuple(int(v) for v in patch)  # type: ignore[return-value]
    if not shapes:
        raise ValueError("--crop case needs the preprocessed case shapes")
    size = _round_up(np.max(np.asarray(shapes, dtype=np.int64), 0), input_divisor(architecture))
    if math.prod(size) > CASE_CROP_MAX_VOXELS:
        raise BadInputError(None, f"--crop case: the largest case needs a {' x '.join(map(str, size))} crop "
                                  f"({math.prod(size):,} voxels), above the cap of {CASE_CROP_MAX_VOXELS:,} voxels; "
                                  "use --crop patch or an explicit --crop-size Z Y X")
    return size  # type: ignore[return-value]


class ClassifierNet(nn.Module):
    """Encoder -> global average ‖ maximum of the deepest map -> (dropout) -> linear head."""

    def __init__(self, encoder: DownstreamEncoder, channels: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * channels, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return avg_max_pool(self.backbone(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))


def build_classifier(architecture: dict, in_channels: int, n_classes: int, patch: Sequence[int],
                     encoder_state: dict[str, torch.Tensor] | None = None, dropout: float = 0.0) -> ClassifierNet:
    """The downstream network's encoder (pretrained when ``encoder_state`` is given) + pooling + linear head."""
    net = build_network_from_plans(architecture, in_channels, n_classes, deep_supervision=False)
    if encoder_state is not None:
        transfer_encoder(net, encoder_state)  # every key checked; fails loudly on a mismatch
    encoder = DownstreamEncoder(net)
    return ClassifierNet(encoder, encoder.out_channels(in_channels, tuple(patch)), n_classes, dropout)


def encoder_depths(encoder: nn.Module) -> dict[str, int]:
    """Block index of every encoder parameter, in registration (= forward) order: a block is the name up to its
    first numeric part (``encoder.stages.2``, ``swinViT.layers1.0``), else the parent module (``encoder.stem``)."""
    blocks: dict[str, int] = {}
    out = {}
    for name, _ in encoder.named_parameters():
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit() or re.fullmatch(r"layers\d+", p)), len(parts) - 2)
        block = ".".join(parts[: cut + 1])
        out[name] = blocks.setdefault(block, len(blocks))
    return out


def classifier_param_groups(model: ClassifierNet, weight_decay: float, encoder_lr_factor: float = 1.0,
                            layer_decay: float | None = None) -> list[dict]:
    """AdamW groups (no decay on norms/biases) with ``lr_factor``: head 1, encoder block d of n
    ``encoder_lr_factor * layer_decay ** (n - d)``."""
    depths = encoder_depths(model.backbone)
    n = max(depths.values(), default=-1) + 1
    factors: dict[float, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        f = 1.0
        if name.startswith("backbone."):
            f = encoder_lr_factor * (layer_decay ** (n - depths[name[len("backbone."):]]) if layer_decay else 1.0)
        factors.setdefault(f, []).append(name)
    params = dict(model.named_parameters())
    groups = []
    for f, names in factors.items():
        holder = nn.Module()
        for i, nm in enumerate(names):
            holder.register_parameter(nm.replace(".", "_") + f"_{i}", params[nm])
        for g in param_groups(holder, weight_decay):
            if g["params"]:
                groups.append({**g, "lr_factor": f})
    return groups


class GroupWarmupCosine(WarmupCosine):
    """``WarmupCosine`` that keeps each group's ``lr_factor``."""

    def step(self, it: int) -> float:
        lr = self.lr_at(it)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_factor", 1.0)
        return lr


def centred_padding(shape: Sequence[int], size: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis (before, after) padding that centres ``shape`` in ``size`` (no padding where it is already larger),
    as nnU-Net's loader places a case smaller than the patch."""
    return [((p - s) // 2, p - s - (p - s) // 2) if p > s else (0, 0) for s, p in zip(shape, size)]


@torch.inference_mode()
def sliding_window_logits(fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray | torch.Tensor,
                          patch: Sequence[int], device: torch.device, batch: int = 2,
                          mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """``fn`` (logits or embeddings of a batch of patches) averaged over 50 %-overlap patch tiles covering the
    whole ``(C, Z, Y, X)`` image; an axis shorter than the patch is zero-padded on both sides, the image centred
    (as nnU-Net's loader crops such an axis in training and its ``pad_nd_image`` pads at inference).
    ``mirror_axes`` (spatial, 0-2): also averaged over every mirrored copy of each tile along any subset of them,
    as nnU-Net's predictor averages logits over its test-time mirrorings."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    shape = tuple(x.shape[1:])
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    x = torch.nn.functional.pad(x, [v for pair in reversed(centred_padding(shape, patch)) for v in pair])
    steps = compute_steps_for_sliding_window(padded, tuple(patch), TILE_STEP)
    starts = [(z, y, xx) for z in steps[0] for y in steps[1] for xx in steps[2]]
    flips = [[a + 2 for a in combo] for r in range(len(mirror_axes) + 1)
             for combo in itertools.combinations(sorted(set(mirror_axes)), r)]
    total, count = None, 0
    for i in range(0, len(starts), batch):
        tiles = torch.stack([x[:, z:z + patch[0], y:y + patch[1], xx:xx + patch[2]]
                             for z, y, xx in starts[i:i + batch]]).to(device)
        for dims in flips:
            out = fn(torch.flip(tiles, dims) if dims else tiles).float().cpu()
            total = out.sum(0) if total is None else total + out.sum(0)
            count += out.shape[0]
    return total / count


class SSLClassificationTrainer(StepwiseScheduleMixin, CheckpointExtrasMixin, TrainerInitMixin, nnUNetTrainer):
    mode = "finetune"

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.case_labels: dict[str, int] = {}
        self.class_names: list[str] = []
        self.train_keys: list[str] = []
        self.val_keys: list[str] = []
        self.encoder_state: dict[str, torch.Tensor] | None = None
        self.crop_size: tuple[int, int, int] | None = None  # training crop = scoring tile; None: the planned patch
        self.augment = "mirror"  # or "nnunet": nnU-Net's training transforms (AUGMENTS)
        self.channels_last = True  # CPU only: channels_last_3d weights (same values, faster oneDNN convolutions)
        self.num_epochs = 50
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 0  # validation classifies whole cases at epoch end instead
        self.initial_lr = 1e-4
        self.weight_decay = 0.05
        self.betas = (0.9, 0.999)
        self.warmup_fraction = 0.05
        self.grad_clip = 3.0
        self.encoder_lr_factor = 1.0
        self.layer_decay: float | None = None
        self.class_balanced = False
        self.dropout = 0.0
        self.seed = DEFAULT_SEED
        self.save_every = 1  # small models: a resumable state after every epoch
        self.show_progress = True
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 0.0
        self.global_step = 0
        self.best_score: list[float] | None = None
        self._bar = None

    # ---- network, optimizer --------------------------------------------------------------------------------
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize called twice")
        if not self.case_labels or not self.train_keys:
            raise RuntimeError("set case_labels, class_names and train_keys before initialize()")
        seed_everything(derive_seed(self.seed, "cls-init"))
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        state = self.encoder_state if self.mode == "finetune" else None
        self.network = build_classifier(self.configuration_manager.configuration["architecture"],
                                        self.num_input_channels, len(self.class_names),
                                        self.crop, state, self.dropout).to(self.device)
        self._set_memory_format()
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        weights = None
        if self.class_balanced:
            counts = np.bincount([self.case_labels[k] for k in self.train_keys], minlength=len(self.class_names))
            weights = torch.tensor(len(self.train_keys) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
        self.loss = nn.CrossEntropyLoss(weight=weights.to(self.device) if weights is not None else None)
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True

    def configure_optimizers(self):
        groups = classifier_param_groups(self.network, self.weight_decay, self.encoder_lr_factor, self.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=self.betas)
        total = self.num_epochs * self.num_iterations_per_epoch
        return optimizer, GroupWarmupCosine(optimizer, self.initial_lr, total, int(round(self.warmup_fraction * total)))

    def set_deep_supervision_enabled(self, enabled: bool):
        pass

    def plot_network_architecture(self):
        pass

    # ---- data ----------------------------------------------------------------------------------------------
    @property
    def crop(self) -> tuple[int, ...]:
        return tuple(int(v) for v in (self.crop_size or self.configuration_manager.patch_size))

    def do_split(self):
        return list(self.train_keys), list(self.val_keys)

    def training_transforms(self) -> tuple[tuple[int, ...], ComposeTransforms]:
        """The loader's crop and the transforms that turn it into a ``crop``-sized training input."""
        patch = self.crop
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment {self.augment!r}: choose {' or '.join(AUGMENTS)}")
        if self.augment == "mirror":
            return patch, ComposeTransforms([MirrorTransform(allowed_axes=(0, 1, 2))])
        # nnU-Net's choices for the plan (rotation range, 2-D augmentation of anisotropic patches, mirror axes) and
        # its initial crop, large enough that rotation and scaling leave no empty corner, computed for this crop
        rotation, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial[0] = patch[0]
        transforms = self.get_training_transforms(
            patch, rotation, None, mirror_axes, dummy_2d, self.configuration_manager.use_mask_for_norm,
            False, self.label_manager.foreground_labels, None, None)
        return tuple(int(v) for v in initial), transforms

    def get_dataloaders(self):
        patch = self.crop
        ds = self.dataset_class(self.preprocessed_dataset_folder, self.train_keys)
        initial, transforms = self.training_transforms()
        dl = nnUNetDataLoader(ds, self.batch_size, initial, patch, self.label_manager,
                              oversample_foreground_percent=0.0, transforms=transforms)
        seed_everything(derive_seed(self.seed, "cls-data"))
        # single-threaded: crops of a few small volumes; no worker start-up, deterministic given the seed
        return SingleThreadedAugmenter(dl, None), None

    def load_image(self, key: str) -> np.ndarray:
        data, _, _, _ = self.dataset_class(self.preprocessed_dataset_folder, [key]).load_case(key)
        return np.asarray(data)

    def tta_mirror_axes(self) -> tuple[int, ...]:
        """The axes training mirrors along (nnU-Net's choice for the plan with ``augment="nnunet"``)."""
        if self.augment == "mirror":
            return (0, 1, 2)
        return tuple(self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] or ())

    def predict_logits(self, keys: Sequence[str], progress: bool = False, tta: bool = False) -> np.ndarray:
        """Whole-case logits ``(N, classes)`` by sliding window, network in eval mode; ``tta``: averaged over the
        training mirrorings too (the final held-out scoring; epoch-end validation runs without, as nnU-Net's)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        was = self.network.training
        self.network.eval()
        patch = self.crop
        axes = self.tta_mirror_axes() if tta else ()
        out = [sliding_window_logits(self.network, self.load_image(k), patch, self.device, self.batch_size, axes)
               for k in tqdm(keys, desc="classify", unit="case", disable=not progress, leave=False)]
        self.network.train(was)
        return torch.stack(out).numpy() if out else np.zeros((0, len(self.class_names)), np.float32)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = torch.tensor([self.case_labels[k] for k in batch["keys"]], device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.loss(self.network(data).float(), target)
        optimizer_step(loss, self.optimizer, self.network.parameters(), self.grad_clip, self.grad_scaler)
        value = loss.detach().cpu().numpy()
        self.advance_step(float(value))
        return {"loss": value}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        self.close_bar()
        super().on_train_epoch_end(train_outputs)

    def on_validation_epoch_start(self):
        self.network.eval()

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        loss, score = float("nan"), float("nan")
        if self.val_keys:
            logits = torch.as_tensor(self.predict_logits(self.val_keys))
            y = torch.tensor([self.case_labels[k] for k in self.val_keys])
            loss = float(nn.functional.cross_entropy(logits, y))
            score = auc(y.numpy(), torch.softmax(logits, 1).numpy())
        self.logger.log("val_losses", loss, self.current_epoch)
        self.logger.log("mean_fg_dice", score, self.current_epoch)  # nnU-Net's plot: validation AUC
        self.logger.log("dice_per_class_or_region", [score], self.current_epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        tr = self.logger.get_value("train_losses", step=-1)
        val = self.logger.get_value("val_losses", step=-1)
        val_auc = self.logger.get_value("mean_fg_dice", step=-1)
        took = self.logger.get_value("epoch_end_timestamps", -1) - self.logger.get_value("epoch_start_timestamps", -1)
        self.print_to_log_file(f"train_loss {tr:.4f}  val_loss {val:.4f}  val_auc {val_auc:.4f}  "
                               f"epoch time {took:.1f} s")
        # higher is better: AUC first (undefined counts as lowest), then the lower loss
        score = [val_auc if not math.isnan(val_auc) else -1.0, -(val if not math.isnan(val) else tr)]
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.print_to_log_file(f"New best: val_auc {val_auc:.4f}, loss {-score[1]:.4f}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def checkpoint_extras(self) -> dict:
        return {"best_score": self.best_score, "global_step": self.global_step, "mode": self.mode,
                "class_names": self.class_names, "train_keys": self.train_keys, "val_keys": self.val_keys,
                "crop_size": list(self.crop)}

    def load_checkpoint_extras(self, extras: dict) -> None:
        if extras.get("train_keys") not in (None, self.train_keys):
            raise BadInputError(self.output_folder, "--c: the checkpoint was trained on other cases (labels, fold, "
                                                    "label budget or seed changed); rerun without --c")
        saved = tuple(extras.get("crop_size") or self.configuration_manager.patch_size)  # older: the patch
        if saved != self.crop:
            raise BadInputError(self.output_folder, f"--c: the checkpoint was trained on {' x '.join(map(str, saved))} "
                                                    f"crops, not {' x '.join(map(str, self.crop))}; rerun with that "
                                                    "crop or without --c")
        self.best_score = extras.get("best_score")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Classification: held-out cases are scored by ssl3d.evaluation.classification.")


class ClsFinetuneTrainer(SSLClassificationTrainer):
    mode = "finetune"


class ClsScratchTrainer(SSLClassificationTrainer):
    mode = "scratch"


TRAINERS = {"finetune": ClsFinetuneTrainer, "scratch": ClsScratchTrainer}
