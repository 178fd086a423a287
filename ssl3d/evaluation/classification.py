"""Classification fine-tuning end to end: labels -> plans transfer -> preprocessing -> splits -> train or probe ->
held-out scoring. :func:`run_classification` is what ``ssl_finetune_cls`` (and a benchmark) calls.

* Plans: ``finetune_plans`` of the pretraining (spacing, transpose, patch, normalization with the pool's
  intensity statistics; a CT window becomes the equivalent CTNormalization) and the method's downstream network,
  saved as ``$nnUNet_preprocessed/<Dataset>/ssl3d_<method>ClsPlans.json``; the labeled cases are preprocessed
  with ssl3d's own resumable pipeline (``run_preprocessing``) into ``ssl3d_<method>ClsPlans_3d_fullres/``.
* Splits: stratified K-fold over the labeled cases (K = min(5, smallest class), fixed seed as nnU-Net's folds);
  the label budget (``n_train`` / ``fraction`` of the fold's training cases) is a stratified, nested prefix drawn
  from ``seed``; for ``finetune``/``scratch`` a stratified 20 % of the budget (at least one case per class, else
  none) validates (model selection), the rest trains. Only the fold's held-out cases are scored.
* Crop (``finetune``/``scratch``): the training crop, which is also the scoring tile: ``patch`` (the planned
  patch), ``case`` (every case whole: :func:`~ssl3d.training.finetuning.classification.resolve_crop` over the
  preprocessed shapes of the fold's budget and held-out cases) or an explicit ``crop_size``.
* ``linear``: the frozen pretrained encoder embeds every budget and held-out case (``embed_image``: sliding
  window; image-weighted global average ‖ maximum of the deepest map, as the classifier pools), an
  L2-regularised scikit-learn logistic regression is fitted on the budget cases; no network training. Embeddings
  are cached per case (resumable) in ``<Trainer>__<plans>__3d_fullres/embeddings/<encoder+plans hash>/`` (or
  ``embedding_cache``), shared by every fold, budget and seed of that encoder.
* Outputs in ``$nnUNet_results/<Dataset>/<Trainer>__<plans>__3d_fullres/fold_<K>[_n<budget>][_s<seed>]/``:
  ``predictions.csv`` (case_id, true, predicted, p_<class>...), ``metrics.json``, ``confusion_matrix.png``,
  ``cls_results.json`` (options, cases, metrics) and the trainer's checkpoints / ``linear_probe.pth``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from ssl3d.data.case_labels import fold_split, label_subset, read_case_labels, stratified_order
from ssl3d.data.labeled import check_encoder_channels, check_images, encoder_channels
from ssl3d.data.readers import discover_inputs, find_raw_dataset
from ssl3d.inference.features import embed_image, load_encoder, resolve_device
from ssl3d.planning.plan_transfer import finetune_plans
from ssl3d.preprocessing.preprocessor import plans_hash, run_preprocessing
from ssl3d.training.external import for_downstream, load_pretrained
from ssl3d.training.finetuning.classification import AUGMENTS, MODES, TRAINERS, check_crop, resolve_crop
from ssl3d.training.finetuning.cls_metrics import (classification_metrics, fit_logistic_regression, predict_logistic,
                                                   probe_state, save_confusion_png)
from ssl3d.training.seeding import derive_seed
from ssl3d.utils import DEFAULT_SEED, BadInputError, BadInputs, atomic_write, env_dir, read_json, write_json

logger = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
LINEAR_TRAINER = "ClsLinearProbe"


@dataclass
class ClsOptions:
    dataset: str
    pretraining: str
    labels_csv: str | None = None
    fold: int = 0
    mode: str = "finetune"
    epochs: int = 20
    iters: int = 20
    lr: float = 1e-4
    batch_size: int = 2
    device: str = "cuda"
    fraction: float | None = None
    n_train: int | None = None
    seed: int = DEFAULT_SEED
    val_fraction: float = 0.2
    encoder_lr_factor: float = 1.0
    layer_decay: float | None = None
    class_balanced: bool = False
    dropout: float = 0.0
    l2: float = 1e-2
    continue_training: bool = False
    overwrite: bool = False  # replace a finished fold (default: refuse)
    num_processes: int = 1
    progress: bool = True
    pretrain_fold: str = "0"
    embedding_cache: str | None = None  # linear mode; default: ``embeddings/`` next to the fold folders
    crop: str = "patch"  # training crop = scoring tile: patch (planned) or case (whole cases, small volumes)
    crop_size: tuple[int, int, int] | None = None  # explicit crop instead (with crop "patch")
    augment: str = "mirror"  # training augmentation: mirror (all axes) or nnunet (nnU-Net's training transforms)
    tta: bool = True  # held-out scoring averaged over the training mirrorings (nnU-Net's test-time mirroring)


def _validation_split(labels: dict[str, int], budget: list[str], fraction: float, seed: int) -> tuple[list, list]:
    n_classes = len({labels[k] for k in budget})
    n_val = int(round(fraction * len(budget)))
    if n_val < n_classes:
        return sorted(budget), []
    order = stratified_order(labels, budget, derive_seed(seed, "cls-val"))
    val, train = order[:n_val], order[n_val:]
    if len({labels[k] for k in train}) < n_classes:  # every class must still be trained on
        return sorted(budget), []
    return sorted(train), sorted(val)


def case_shape(data_dir: Path, key: str) -> tuple[int, ...]:
    """Spatial shape of a preprocessed case (blosc2 arrays open lazily: nothing is decompressed)."""
    data, _, _, _ = infer_dataset_class(str(data_dir))(str(data_dir), [key]).load_case(key)
    return tuple(int(s) for s in data.shape[1:])


def load_preprocessed(data_dir: Path, key: str) -> np.ndarray:
    data, _, _, _ = infer_dataset_class(str(data_dir))(str(data_dir), [key]).load_case(key)
    return np.asarray(data, dtype=np.float32)


def prepare(opts: ClsOptions) -> dict:
    """Labels, plans and preprocessing (resumable); everything both modes need."""
    if opts.mode not in MODES:
        raise BadInputError(None, f"unknown mode '{opts.mode}' ({', '.join(MODES)})")
    if opts.augment not in AUGMENTS:
        raise BadInputError(None, f"--augment {opts.augment}: choose {' or '.join(AUGMENTS)}")
    if opts.mode == "linear" and (opts.crop != "patch" or opts.crop_size is not None):
        raise BadInputError(None, "--crop/--crop-size apply to --mode finetune and scratch (the linear probe embeds "
                                  "whole cases by sliding window of the planned patch)")
    pre_root, res_root = env_dir("nnUNet_preprocessed"), env_dir("nnUNet_results")
    if pre_root is None or res_root is None or env_dir("nnUNet_raw") is None:
        raise BadInputError(None, "set nnUNet_raw, nnUNet_preprocessed and nnUNet_results")
    raw = find_raw_dataset(str(opts.dataset))
    cases, channel_names = discover_inputs([str(raw)])
    labels, names = read_case_labels(raw / "dataset.json", [c.case_id for c in cases], opts.labels_csv)
    src = load_pretrained(opts.pretraining, opts.pretrain_fold)  # ssl3d results folder or foreign checkpoint
    if src.kind == "ssl3d":  # a foreign encoder's input projection adapts to the dataset's channels
        check_encoder_channels(len(channel_names), encoder_channels(src.plans), raw / "dataset.json")
    src = for_downstream(src, len(channel_names))
    if not src.architecture:
        raise BadInputError(src.checkpoint, f"method '{src.method_name}' has no downstream network")
    if src.plans["configurations"][CONFIGURATION].get("spacing") is None:
        raise BadInputError(src.checkpoint, "the pretraining plan has no spacing (nnssl 'noresample'); "
                                            "classification needs a fixed target spacing")
    folder, ckpt, info = src.folder, src.checkpoint, {**src.info, "name": src.method_name}
    check_images([c for c in cases if c.case_id in labels], opts.num_processes)  # before anything is written
    plans_name = f"ssl3d_{info['name']}ClsPlans"
    plans = finetune_plans(src.plans, src.architecture, raw.name, plans_name,
                           {"batch_size": opts.batch_size, "method": info["name"], "pretrained_from": str(ckpt)},
                           src.patch_size)
    cfg = plans["configurations"][CONFIGURATION]
    if opts.mode != "linear":  # a crop the network cannot take: refused before anything is written
        check_crop(opts.crop, opts.crop_size, cfg["architecture"], cfg["patch_size"])
    target = pre_root / raw.name
    write_json(target / f"{plans_name}.json", plans)
    write_json(target / "dataset.json", {"channel_names": channel_names, "labels": {"background": 0, "body": 1},
                                         "numTraining": len(labels), "file_ending": ".nii.gz", "name": raw.name,
                                         "description": "ssl3d classification; seg arrays hold a body mask",
                                         "ssl3d_case_labels": labels, "ssl3d_classes": dict(enumerate(names))})
    fp = (folder or Path("/nonexistent")) / "dataset_fingerprint.json"  # nnU-Net copies one; the pool's one
    if fp.is_file() and not (target / "dataset_fingerprint.json").is_file():
        shutil.copyfile(fp, target / "dataset_fingerprint.json")
    elif not (target / "dataset_fingerprint.json").is_file():
        write_json(target / "dataset_fingerprint.json", {})
    data_dir = target / plans["configurations"][CONFIGURATION]["data_identifier"]
    _, _, errors = run_preprocessing([c for c in cases if c.case_id in labels], plans, CONFIGURATION, data_dir,
                                     opts.num_processes, opts.progress)
    if errors:
        raise BadInputs(list(errors.values()))
    train, test = fold_split(labels, opts.fold, DEFAULT_SEED)
    budget = label_subset(labels, train, opts.seed, opts.n_train, opts.fraction)
    tag = f"{opts.fold}" + (f"_n{len(budget)}" if len(budget) < len(train) else "") + \
        (f"_s{opts.seed}" if opts.seed != DEFAULT_SEED else "")
    crop = None
    if opts.mode != "linear":
        # the shapes of every case this run sees, held-out ones included: a shape is not a label (no leakage),
        # and with them every scored case fits one tile
        shapes = [case_shape(data_dir, k) for k in budget + test] if opts.crop == "case" else ()
        crop = resolve_crop(opts.crop, opts.crop_size, cfg["architecture"], cfg["patch_size"], shapes)
        logger.info("training crop and scoring tile: %s (--crop %s)", " x ".join(map(str, crop)),
                    "size" if opts.crop_size is not None else opts.crop)
    return {"raw": raw, "labels": labels, "names": names, "folder": folder, "checkpoint": ckpt, "source": src,
            "info": info, "plans": plans, "plans_name": plans_name, "preprocessed": target, "data_dir": data_dir,
            "budget": budget, "test": test, "tag": tag, "results_root": res_root, "crop": crop}


def _train_network(opts: ClsOptions, p: dict) -> tuple[np.ndarray, Path, dict]:
    train, val = _validation_split(p["labels"], p["budget"], opts.val_fraction, opts.seed)
    trainer = TRAINERS[opts.mode](p["plans"], CONFIGURATION, p["tag"], read_json(p["preprocessed"] / "dataset.json"),
                                  resolve_device(opts.device))
    trainer.case_labels, trainer.class_names = p["labels"], p["names"]
    trainer.train_keys, trainer.val_keys = train, val
    trainer.encoder_state = p["source"].encoder_state if opts.mode == "finetune" else None
    trainer.num_epochs, trainer.num_iterations_per_epoch = opts.epochs, opts.iters
    trainer.initial_lr, trainer.seed, trainer.show_progress = opts.lr, opts.seed, opts.progress
    trainer.encoder_lr_factor, trainer.layer_decay = opts.encoder_lr_factor, opts.layer_decay
    trainer.class_balanced, trainer.dropout = opts.class_balanced, opts.dropout
    trainer.crop_size, trainer.augment = p["crop"], opts.augment
    out = Path(trainer.output_folder)
    if not opts.continue_training and not opts.overwrite and (out / "checkpoint_final.pth").is_file():
        raise BadInputError(out / "checkpoint_final.pth", "a finished result is here; pass --c to score it again "
                                                          "(more --epochs continue it) or --overwrite to replace it")
    if opts.overwrite:  # a killed new run must not look finished
        for old in out.glob("checkpoint_*.pth"):
            old.unlink()
    if opts.continue_training:
        found = [out / n for n in ("checkpoint_final.pth", "checkpoint_latest.pth") if (out / n).is_file()]
        if found:
            logger.info("continuing from %s", found[0])
            trainer.load_checkpoint(str(found[0]))
        else:
            logger.info("--c: no checkpoint in %s; starting from scratch", out)
    if trainer.current_epoch < trainer.num_epochs:
        trainer.run_training()
    elif not trainer.was_initialized:
        trainer.initialize()
    best = out / "checkpoint_best.pth"
    if val and best.is_file():  # the selected model is the one scored
        trainer.network.load_state_dict(torch.load(best, map_location=trainer.device, weights_only=False)["network_weights"])
    logits = torch.as_tensor(trainer.predict_logits(p["test"], opts.progress, tta=opts.tta))
    return torch.softmax(logits, 1).numpy(), out, {"train_cases": train, "val_cases": val,
                                                   "epochs_trained": trainer.current_epoch}


def _linear_probe(opts: ClsOptions, p: dict) -> tuple[np.ndarray, Path, dict]:
    out = (p["results_root"] / p["raw"].name / f"{LINEAR_TRAINER}__{p['plans_name']}__{CONFIGURATION}" /
           f"fold_{p['tag']}")
    # a case's embedding depends on the encoder and the preprocessing only, not on fold, budget or seed: every
    # probe of the same encoder shares one cache, in a subfolder per (checkpoint, plans) so nothing goes stale
    meta = {"checkpoint": str(Path(p["checkpoint"]).resolve()), "plans_hash": plans_hash(p["plans"], CONFIGURATION),
            "pooling": "avg+max"}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(opts.embedding_cache or out.parent / "embeddings") / key
    write_json(cache / "meta.json", meta)
    keys = sorted(set(p["budget"]) | set(p["test"]))
    emb, encoder = {}, None
    for k in tqdm(keys, desc="embed", unit="case", disable=not opts.progress):
        f = cache / f"{k}.npy"
        if f.is_file():
            emb[k] = np.load(f)
            continue
        if encoder is None:  # loaded only when a case is not cached yet
            encoder = load_encoder(opts.pretraining, opts.pretrain_fold, opts.device, len(p["source"].plans[
                "configurations"][CONFIGURATION]["normalization_schemes"]))
        res = embed_image(encoder, load_preprocessed(p["data_dir"], k))
        emb[k] = np.concatenate([res["embedding"], res["embedding_max"]])  # as ClassifierNet pools
        atomic_write(f, lambda fh, e=emb[k]: np.save(fh, e))
        logger.debug("embedded %s -> %s", k, f)
    y = [p["labels"][k] for k in p["budget"]]
    model = fit_logistic_regression(np.stack([emb[k] for k in p["budget"]]), y, opts.l2)
    atomic_write(out / "linear_probe.pth", lambda fh: torch.save({**probe_state(model), "class_names": p["names"],
                                                                   "train_cases": p["budget"], "l2": opts.l2}, fh))
    probs = predict_logistic(model, np.stack([emb[k] for k in p["test"]]), len(p["names"]))
    return probs, out, {"train_cases": p["budget"], "val_cases": []}


def write_predictions(out: Path, cases: list[str], y_true: list[int], probs: np.ndarray, names: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "true", "predicted", *[f"p_{n}" for n in names]])
    for c, t, pr in zip(cases, y_true, probs):
        w.writerow([c, names[t], names[int(pr.argmax())], *[f"{v:.6f}" for v in pr]])
    atomic_write(out / "predictions.csv", lambda f: f.write(buf.getvalue()), "w")


def run_classification(opts: ClsOptions) -> dict:
    """Train (or probe) and score the fold's held-out cases. Returns the metrics dict plus run details."""
    p = prepare(opts)
    logger.info("%s: %d labeled cases, fold %d: %d in the label budget, %d held out (classes: %s)", p["raw"].name,
                len(p["labels"]), opts.fold, len(p["budget"]), len(p["test"]), ", ".join(p["names"]))
    probs, out, extra = (_linear_probe if opts.mode == "linear" else _train_network)(opts, p)
    y = [p["labels"][k] for k in p["test"]]
    metrics = classification_metrics(y, probs, p["names"])
    metrics["crop_size"] = list(p["crop"]) if p["crop"] else None  # training crop = scoring tile (None: linear)
    metrics["mirror_tta"] = opts.tta and opts.mode != "linear"
    write_predictions(out, p["test"], y, probs, p["names"])
    write_json(out / "metrics.json", metrics)
    save_confusion_png(metrics["confusion_matrix"], p["names"], out / "confusion_matrix.png",
                       f"{opts.mode}, fold {p['tag']}: AUC {metrics['auc']:.3f}")
    summary = {"metrics": metrics, "mode": opts.mode, "method": p["info"]["name"], "dataset": p["raw"].name,
               "fold": opts.fold, "seed": opts.seed, "n_budget": len(p["budget"]), "test_cases": p["test"],
               "output_folder": str(out), "pretrained_from": str(p["checkpoint"]), "options": asdict(opts),
               "crop_size": metrics["crop_size"], **extra}
    write_json(out / "cls_results.json", summary)
    logger.info("held-out %d cases: AUC %.3f, balanced accuracy %.3f -> %s", len(y), metrics["auc"],
                metrics["balanced_accuracy"], out)
    return {**metrics, "output_folder": str(out), "n_budget": len(p["budget"])}
