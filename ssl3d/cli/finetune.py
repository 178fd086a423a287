"""``ssl_finetune``, ``ssl_export_weights``, ``ssl_nnunet_ext_path``: fine-tune with stock nnU-Net.

``ssl_finetune -d 802 -p <pretraining results> -f 0`` plans the labeled dataset with the pretraining's
spacing, normalization, patch size and downstream architecture (an nnU-Net plans file of its own), runs
nnU-Net's fingerprint and preprocessing, exports the pretrained weights and calls stock ``nnUNetv2_train ...
-pretrained_weights`` with ``nnUNet_extTrainer`` pointing at ssl3d's shim folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli
from ssl3d.data.labeled import check_labeled_dataset, encoder_channels
from ssl3d.inference.nnunet_bridge import ext_trainer_path, nnunet_dataset_name, run_nnunet
from ssl3d.planning.plan_transfer import finetune_plans
from ssl3d.utils import DEFAULT_SEED, BadInputError, env_dir, read_json, write_json

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="labeled nnU-Net raw dataset (id or name)")
    p.add_argument("-p", required=True, help="pretraining results folder (<Trainer>__ssl3dPlans__3d_fullres) or a "
                                             "foreign checkpoint file (nnssl, MONAI SwinUNETR)")
    p.add_argument("-f", default="0", type=V.fold, help="fold (0-4 or all)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("-np", type=V.positive_int, default=4, help="processes for nnU-Net's fingerprint and preprocessing")
    p.add_argument("--scratch", action="store_true", help="same plans and schedule, no pretrained weights")
    p.add_argument("--c", action="store_true", help="continue this fold's unfinished training (a finished one is "
                                                    "reported, not redone)")
    V.add_overwrite(p)
    p.add_argument("--epochs", type=V.positive_int, default=None)
    p.add_argument("--iters", type=V.positive_int, default=None)
    p.add_argument("--val-iters", type=V.positive_int, default=None)
    p.add_argument("--batch-size", type=V.positive_int, default=2)
    p.add_argument("--lr", type=V.positive_float, default=None)
    p.add_argument("--warmup", choices=["linear", "decoder"], default="linear")
    p.add_argument("--warmup-epochs", type=V.nonnegative_int, default=None)
    p.add_argument("--encoder-lr-factor", type=V.nonnegative_float, default=1.0)
    p.add_argument("--optimizer", choices=["auto", "sgd", "adamw"], default="auto")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="frozen-encoder probe: the encoder keeps its loaded weights (pretrained, or with --scratch "
                        "the seed's random ones) and runs in eval mode; only decoder and head train")
    shots = p.add_mutually_exclusive_group()
    shots.add_argument("--n-train", type=V.positive_int, default=None, help="few-shot: K training cases of the fold")
    shots.add_argument("--fraction", type=V.unit_fraction, default=None, help="few-shot: this fraction of the fold")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed for initialisation, data order and augmentation (default nnU-Net's {DEFAULT_SEED})")
    p.add_argument("--val", "--final-val", dest="final_val", action=argparse.BooleanOptionalAction, default=None,
                   help="nnU-Net's final sliding-window validation of the fold's validation cases, with progress "
                        "(default: on for cuda, off on CPU/MPS, where it takes far longer than a short training)")
    p.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU speed-ups that leave the batches, network and loss unchanged: torch threads = the cores "
                        "the augmentation workers leave free, progress.png only at the end, no checkpoint_best.pth "
                        "(default: on for cpu, off for cuda/mps)")
    p.add_argument("--checkpoints-at", type=V.unit_fraction, nargs="+", default=None, metavar="F",
                   help="also write checkpoint_ep<E>.pth after these fractions of the epochs (e.g. 0.25 0.5)")
    p.add_argument("--prepare-only", action="store_true", help="plan, preprocess and export; do not train")
    return p


def _run(args: argparse.Namespace) -> int:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from ssl3d.training.export import write_downstream_weights
    from ssl3d.training.finetune_schedule import CPU_SPEED_OPTIONS
    from ssl3d.training.external import for_downstream, load_pretrained
    from ssl3d.training.external.source import complete_plans

    V.require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    V.check_device(args.device)
    if args.c and args.overwrite:
        raise BadInputError(None, "--c and --overwrite exclude each other")
    pre_root = env_dir("nnUNet_preprocessed")
    dataset = nnunet_dataset_name(args.d)
    dataset_id = int(dataset[7:10])
    source = load_pretrained(args.p)  # an ssl3d results folder or a foreign (nnssl, MONAI) checkpoint file
    ckpt = source.checkpoint
    if not source.architecture:
        raise BadInputError(ckpt, f"method '{source.method_name}' has no downstream segmentation network")
    plans_name = f"ssl3d_{source.method_name}Plans" + ("_scratch" if args.scratch else "")
    fold_dir = env_dir("nnUNet_results") / dataset / f"SSLFinetuneTrainer__{plans_name}__3d_fullres" / f"fold_{args.f}"
    if args.c and (fold_dir / "checkpoint_final.pth").is_file():
        logger.info("already finished: %s (--overwrite trains it again)", fold_dir / "checkpoint_final.pth")
        return 0
    resume = args.c and (fold_dir / "checkpoint_latest.pth").is_file()
    if not args.c and not args.overwrite:
        V.refuse_finished(fold_dir)
    for out in (pre_root / dataset, fold_dir):
        V.check_writable(out)
    # before any write; a foreign encoder's input projection adapts to the dataset's channels, an ssl3d one must fit
    _, lab_dj = check_labeled_dataset(env_dir("nnUNet_raw") / dataset,
                                      encoder_channels(source.plans) if source.kind == "ssl3d" else None, args.np)
    source = for_downstream(source, len(lab_dj.get("channel_names", lab_dj.get("modality"))))
    options = {k: v for k, v in {
        "num_epochs": args.epochs, "num_iterations_per_epoch": args.iters, "num_val_iterations_per_epoch":
        args.val_iters, "lr": args.lr, "warmup": args.warmup, "warmup_epochs": args.warmup_epochs,
        "encoder_lr_factor": args.encoder_lr_factor, "optimizer": args.optimizer, "n_train": args.n_train,
        "fraction": args.fraction, "seed": args.seed, "batch_size": args.batch_size,
        "freeze_encoder": args.freeze_encoder or None,
        "final_validation": args.device == "cuda" if args.final_val is None else args.final_val,
        "pretrained_from": str(ckpt), "method": source.method_name, "checkpoints_at": args.checkpoints_at,
        **(CPU_SPEED_OPTIONS if (args.device == "cpu" if args.lean is None else args.lean) else {})}.items()
        if v is not None}
    plans = finetune_plans(source.plans, source.architecture, dataset, plans_name, options, source.patch_size)

    target = pre_root / dataset
    if not (target / "dataset_fingerprint.json").is_file():
        logger.info("nnU-Net fingerprint of %s", dataset)
        extract_fingerprint_dataset(dataset_id, num_processes=args.np, check_dataset_integrity=True, clean=True,
                                    verbose=False)
    raw_dj = env_dir("nnUNet_raw") / dataset / "dataset.json"
    write_json(target / "dataset.json", read_json(raw_dj))
    if plans["configurations"]["3d_fullres"].get("median_image_size_in_voxels") is None:  # foreign plans
        plans = complete_plans(plans, read_json(target / "dataset_fingerprint.json"))
    write_json(target / f"{plans_name}.json", plans)
    data_dir = target / plans["configurations"]["3d_fullres"]["data_identifier"]
    if not data_dir.is_dir() or not any(data_dir.glob("*.pkl")):
        logger.info("nnU-Net preprocessing of %s with %s", dataset, plans_name)
        preprocess_dataset(dataset_id, plans_name, ("3d_fullres",), [args.np], verbose=False)
    cmd = ["nnUNetv2_train", dataset, "3d_fullres", args.f, "-p", plans_name, "-tr", "SSLFinetuneTrainer",
           "-device", args.device]
    if args.overwrite and not args.prepare_only:  # a killed new run must not look finished
        for old in fold_dir.glob("checkpoint_*.pth"):
            old.unlink()
    if resume:
        cmd.append("--c")  # nnU-Net continues from checkpoint_latest (its weights, not the pretrained ones)
    elif not args.scratch:
        n_classes = len(read_json(raw_dj)["labels"])
        weights = target / f"{plans_name}__pretrained_weights.pth"
        write_downstream_weights(source, weights, n_classes, DEFAULT_SEED if args.seed is None else args.seed)
        cmd += ["-pretrained_weights", str(weights)]
    # nnU-Net's final validation otherwise spawns 8 export workers whatever the machine has
    return run_nnunet(cmd, {"nnUNet_def_n_proc": str(args.np)}, dry_run=args.prepare_only)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ssl_export_weights",
                                description="Write pretrained weights for nnUNetv2_train -pretrained_weights.")
    p.add_argument("-p", required=True, help="pretraining results folder (or a foreign checkpoint file)")
    p.add_argument("-o", required=True, help="output .pth file")
    p.add_argument("--format", default="nnunet", choices=["nnunet", "nnssl"],
                   help="nnunet: full downstream state_dict for -pretrained_weights (default); nnssl: network "
                        "weights + nnssl_adaptation_plan for nnssl's fine-tuning (spark simclr mocov2 byol voco)")
    p.add_argument("-f", default="0", type=V.fold, help="pretraining fold (default 0)")
    p.add_argument("--num-classes", type=V.positive_int, default=2,
                   help="segmentation heads (skipped by nnU-Net's loader)")

    def body(a):
        from ssl3d.training.export import export_weights

        V.check_writable(Path(a.o).absolute().parent, "folder of the output file")

        res = export_weights(a.p, a.o, a.num_classes, a.f, fmt=a.format)
        logger.info("downstream network: %s", res["architecture"]["network_class_name"])
        return 0

    return run_cli(p, body, argv)


def ext_path_main(argv: list[str] | None = None) -> int:
    """Print the nnUNet_extTrainer value: ``export nnUNet_extTrainer=$(ssl_nnunet_ext_path)``."""
    print(ext_trainer_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
