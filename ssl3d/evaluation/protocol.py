"""What a label-efficiency benchmark runs: presets, arms (method | scratch × fine-tuned | frozen encoder × label
count × seed; for classification
method/mode | scratch × label fraction × seed), the held-out test set and the few-shot subsets, all decided
before anything trains."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ssl3d.training.finetuning.trainer import few_shot_subset
from ssl3d.training.methods import get_method_spec
from ssl3d.utils import DEFAULT_SEED, BadInputError, read_json

SCRATCH = "scratch"

# small: fits 2 CPU cores (tiny networks, short schedules); paper: the real-size setting for a GPU
PRESETS: dict[str, dict] = {
    # small: AdamW 1e-3 because nnU-Net's SGD (0.01) barely starts learning a tiny network in a few hundred steps.
    # ft_epochs 300 x 10: on the current demo data (8 trainable cases) scratch with all of them was on the steep
    # part at 1000 iterations: held-out Dice (12 test cases, seed 0) .177 / .200 / .303 at 250 / 500 / 1000, and
    # .307 / .526 / .596 at 750 / 1500 / 3000 in a 3000-iteration run (docs/small_benchmark/run.md); 3000 is past
    # the knee, not a flat plateau. (100 x 10 had plateaued on the earlier 7-case data, docs/small_preset/.)
    # pretrain_lr (AdamW peak; None: the method's default): small 1e-3 (the registry's cap, the small fine-tuning
    # LR) because its 1000 pretraining steps are ~1/250 of a real schedule. At the methods' long-schedule defaults
    # (1e-4 for SparK) Adam moves a weight by at most ~1e-4 per step, and 1000 steps left the SparK encoder's norm
    # weights within 1-2 % of 1 and its conv weight s.d. at a fresh initialisation's (docs/small_n1/run.md).
    "small": {"size": "tiny", "patch_size": None, "pretrain_epochs": 100, "pretrain_iters": 10, "pretrain_batch": 2,
              "pretrain_lr": 1e-3,
              "ft_epochs": 300, "ft_iters": 10, "ft_val_iters": 1, "ft_batch": 2, "tta": False, "ft_lr": 1e-3,
              "encoder_lr_factor": 1.0, "warmup": "linear", "optimizer": "adamw", "arms": ["finetune", "frozen"],
              "test_cases": 12, "ft_checkpoints_at": [0.25, 0.5]},
    "paper": {"size": None, "patch_size": None, "pretrain_epochs": 1000, "pretrain_iters": 250, "pretrain_batch": None,
              "pretrain_lr": None,
              "ft_epochs": 1000, "ft_iters": 250, "ft_val_iters": 50, "ft_batch": 2, "tta": True, "ft_lr": None,
              "encoder_lr_factor": 1.0, "warmup": "linear", "optimizer": "auto", "arms": ["finetune"],
              "test_cases": None, "ft_checkpoints_at": [0.25, 0.5]},
}
# ft_checkpoints_at: held-out Dice is also scored from checkpoints after these fractions of the fine-tuning budget
# (convergence curve and iterations to 90 % of scratch's final Dice, ssl3d/evaluation/convergence.py)

# the keys of a preset that pretraining reads (shared by both tasks)
PRETRAIN_KEYS = ("size", "patch_size", "pretrain_epochs", "pretrain_iters", "pretrain_batch", "pretrain_lr")
# classification fine-tuning (``--task cls``), merged over the pretraining keys of the preset of the same name.
# small: what solved the easy fatty-liver variant (dataset 804, its own 160 / 40 split; docs/
# classification_investigation.md section 7): every case whole in the crop, AdamW 3e-3, 18 x 100 iterations (scratch
# needed 1200, the fine-tuned tiny SparK 1800 for held-out AUC >= 0.95), no validation split (the final network is
# scored: selecting on a few validation cases was one of the failure causes examined there). The 30-60 HU task was
# not used to choose it. paper: the planned network and patch, 50 x 250 AdamW iterations at ssl_finetune_cls's
# default 1e-4, not tuned on data.
CLS_PRESETS: dict[str, dict] = {
    # crop: ssl_finetune_cls --crop of the finetune/scratch arms (patch: the planned patch; case: whole cases)
    "small": {"ft_epochs": 18, "ft_iters": 100, "ft_lr": 3e-3, "ft_batch": 2, "encoder_lr_factor": 1.0, "l2": 1e-2,
              "val_fraction": 0.0, "crop": "case"},
    "paper": {"ft_epochs": 50, "ft_iters": 250, "ft_lr": 1e-4, "ft_batch": 2, "encoder_lr_factor": 1.0, "l2": 1e-2,
              "val_fraction": 0.2, "crop": "patch"},
}
CLS_MODES = ("finetune", "linear")  # per method; scratch is its own arm
# segmentation: the whole network fine-tuned, or the encoder frozen as loaded (pretrained; for scratch the seed's
# random initialisation) with decoder and head trained, the frozen-encoder probe of what a pretraining learned
SEG_MODES = ("finetune", "frozen")


@dataclass(frozen=True)
class Arm:
    """One fine-tuning run. ``method`` is a registered method or ``scratch``; ``base`` the method whose plans and
    downstream network it uses (for scratch: the same network, randomly initialised)."""

    method: str
    base: str
    n_train: int
    n_label: str  # as asked: "1", "2", ..., "all"
    seed: int
    mode: str = "finetune"  # SEG_MODES

    @property
    def id(self) -> str:
        who = self.method if self.method != SCRATCH else f"{SCRATCH}-{self.base}"
        return f"{who}{'' if self.mode == 'finetune' else '-' + self.mode}__n{self.n_label}__s{self.seed}"

    @property
    def scratch(self) -> bool:
        return self.method == SCRATCH


def setting_changes(old: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """``"key old -> new"`` for every preset key whose value differs between two settings (JSON-comparable values).
    "arms" never counts: it only picks which arms run (finetune / frozen), like --n-train and --seeds."""
    skip = {"arms", *ignore}
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted((set(old) | set(new)) - skip)
            if old.get(k) != new.get(k)]


def downstream_of(method: str) -> str | None:
    """The downstream network class of a registered method; a foreign checkpoint's label (``-p name=<file>``)
    stands for its own network."""
    try:
        return get_method_spec(method).downstream
    except KeyError:
        return method


def scratch_label(base: str, bases: Sequence[str]) -> str:
    """``scratch`` when every method shares one downstream network, else ``scratch (<network>)``."""
    nets = {downstream_of(b) for b in bases}
    if len(nets) == 1:
        return SCRATCH
    return f"{SCRATCH} ({(downstream_of(base) or base).rsplit('.', 1)[-1]})"


def scratch_bases(methods: Sequence[str]) -> list[str]:
    """The first method of each distinct downstream network: whose plans each scratch baseline uses."""
    bases, seen = [], set()
    for m in methods:
        net = downstream_of(m)
        if net not in seen:
            seen.add(net)
            bases.append(m)
    return bases


def plan_arms(methods: Sequence[str], scratch: bool, n_train: Sequence[str], seeds: Sequence[int],
              n_trainable: int, modes: Sequence[str] = ("finetune",)) -> list[Arm]:
    """Every arm, seed-major so that a partial run already holds complete comparisons. One scratch arm per
    distinct downstream network and mode (its own baseline); label counts above the trainable cases are refused."""
    bad = [m for m in modes if m not in SEG_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise BadInputError(None, f"--arms {' '.join(modes)}: each of {', '.join(SEG_MODES)} at most once")
    counts = []
    for k in n_train:
        n = n_trainable if str(k) == "all" else int(k)
        if not 1 <= n <= n_trainable:
            raise BadInputError(None, f"--n-train {k}: only {n_trainable} labeled cases can be trained on "
                                      f"(the rest is the held-out test set)")
        counts.append((n, str(k)))
    bases = scratch_bases(methods)
    arms = []
    for seed in seeds:
        for n, label in counts:
            for mode in modes:
                arms += [Arm(SCRATCH, b, n, label, seed, mode) for b in bases] if scratch else []
                arms += [Arm(m, m, n, label, seed, mode) for m in methods]
    return arms


@dataclass
class HeldOutSplit:
    """Labeled cases that arms may train on, and the held-out test cases (image files per channel + label)."""

    trainable: list[str]
    test_images: dict[str, list[Path]] = field(default_factory=dict)
    test_labels: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"trainable": self.trainable, "test": sorted(self.test_labels),
                **{k: {c: [str(p) for p in v] if isinstance(v, list) else str(v) for c, v in d.items()}
                   for k, d in (("test_images", self.test_images), ("test_labels", self.test_labels))}}


def _cases(images: Path, labels: Path, file_ending: str) -> tuple[dict[str, list[Path]], dict[str, Path]]:
    imgs: dict[str, list[Path]] = {}
    for p in sorted(images.glob(f"*_[0-9][0-9][0-9][0-9]{file_ending}")):
        imgs.setdefault(p.name[: -len(file_ending) - 5], []).append(p)
    labs = {p.name[: -len(file_ending)]: p for p in sorted(labels.glob(f"*{file_ending}"))}
    missing = sorted(set(imgs) - set(labs))
    if missing:
        raise BadInputError(labels, f"no label for {len(missing)} case(s), e.g. {missing[0]}")
    return imgs, labs


def split_test(raw_dataset: Path, test: Path | None, test_fraction: float, min_train: int,
               n_test: int | None = None) -> HeldOutSplit:
    """Hold out a fixed test set. Without ``test``: ``n_test`` seeded cases of the labeled dataset, or without it
    a seeded ``test_fraction`` of them (at least one), leaving ``min_train``, never trained on by any arm. With
    ``test``: a raw dataset folder (imagesTs/labelsTs, else imagesTr/labelsTr) or a folder with images/ and
    labels/."""
    dj = read_json(raw_dataset / "dataset.json")
    ending = dj.get("file_ending", ".nii.gz")
    imgs, labs = _cases(raw_dataset / "imagesTr", raw_dataset / "labelsTr", ending)
    if not imgs:
        raise BadInputError(raw_dataset / "imagesTr", "no labeled cases")
    if test is None:
        ids = sorted(imgs)
        asked = n_test is not None
        n_test = n_test if asked else max(1, int(math.floor(test_fraction * len(ids))))
        if len(ids) - n_test < min_train:
            what = f"{n_test} test cases" if asked else "a test set"
            raise BadInputError(raw_dataset, f"{len(ids)} labeled cases cannot give {what} and {min_train} "
                                             f"training cases; give --test, " + ("fewer --test-cases, " if asked
                                             else "") + "or fewer --n-train")
        chosen = set(np.random.RandomState(DEFAULT_SEED).choice(ids, n_test, replace=False).tolist())
        return HeldOutSplit([i for i in ids if i not in chosen], {i: imgs[i] for i in sorted(chosen)},
                         {i: labs[i] for i in sorted(chosen)})
    for im, lb in (("imagesTs", "labelsTs"), ("imagesTr", "labelsTr"), ("images", "labels")):
        if (test / im).is_dir() and (test / lb).is_dir():
            t_imgs, t_labs = _cases(test / im, test / lb, ending)
            break
    else:
        raise BadInputError(test, "test set needs imagesTs/ + labelsTs/, imagesTr/ + labelsTr/ or images/ + labels/")
    if not t_imgs:
        raise BadInputError(test, "no test images")
    return HeldOutSplit(sorted(imgs), t_imgs, t_labs)


def training_cases(split: HeldOutSplit, arm: Arm) -> list[str]:
    """The few-shot cases of an arm: what ``SSLFinetuneTrainer`` picks for this seed (nested as K grows)."""
    return few_shot_subset(split.trainable, 0, None if arm.n_label == "all" else arm.n_train, None, arm.seed)


def arm_record(arm: Arm | ClsArm) -> dict:
    return asdict(arm) | {"id": arm.id}


@dataclass(frozen=True)
class ClsArm:
    """One classification run: ``method`` a registered method (``mode`` finetune or linear) or ``scratch``
    (mode scratch; ``base``'s plans and downstream network, randomly initialised); ``fraction`` of the fold's
    training cases as label budget."""

    method: str
    base: str
    mode: str
    fraction: float
    seed: int

    @property
    def id(self) -> str:
        who = f"{SCRATCH}-{self.base}" if self.scratch else self.method + ("" if self.mode == "finetune"
                                                                           else f"-{self.mode}")
        return f"{who}__f{self.fraction:g}__s{self.seed}"

    @property
    def scratch(self) -> bool:
        return self.method == SCRATCH


def plan_cls_arms(methods: Sequence[str], scratch: bool, linear: bool, fractions: Sequence[float],
                  seeds: Sequence[int]) -> list[ClsArm]:
    """Every classification arm, seed-major (a partial run already holds complete comparisons): per method
    fine-tuning (and a linear probe with ``linear``), one scratch arm per distinct downstream network."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise BadInputError(None, f"--fractions {bad[0]:g}: a label fraction must be in (0, 1]")
    if len(set(fractions)) != len(fractions):
        raise BadInputError(None, "--fractions: each fraction once")
    bases = scratch_bases(methods)
    modes = CLS_MODES if linear else CLS_MODES[:1]
    arms = []
    for seed in seeds:
        for f in sorted(fractions, reverse=True):
            arms += [ClsArm(SCRATCH, b, "scratch", float(f), seed) for b in bases] if scratch else []
            arms += [ClsArm(m, m, mode, float(f), seed) for m in methods for mode in modes]
    return arms
