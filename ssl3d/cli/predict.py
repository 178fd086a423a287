"""``ssl_predict``: stock ``nnUNetv2_predict`` on an ssl3d fine-tuning result, with the trainer shims found.

``ssl_predict -i images/ -o out/ -d 802`` finds the fine-tuned model under ``$nnUNet_results`` (trainer
``SSLFinetuneTrainer`` unless ``-tr``; plans picked automatically when only one ssl3d plans was fine-tuned,
else ``-p``), sets ``nnUNet_extTrainer`` and runs nnU-Net's own predictor. Arguments after ``--`` go to
``nnUNetv2_predict`` unchanged (e.g. ``-- --disable_tta -npp 1``).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli
from ssl3d.data.labeled import check_prediction_folder, model_dataset_json
from ssl3d.inference.nnunet_bridge import nnunet_dataset_name, resolve_model, run_nnunet
from ssl3d.utils import BadInputError

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="folder of images in nnU-Net naming (case_0000.nii.gz ...)")
    p.add_argument("-o", required=True, help="output folder for the segmentations")
    p.add_argument("-d", required=True, help="dataset the model was fine-tuned on (id or name)")
    p.add_argument("-p", default=None, help="plans identifier, e.g. ssl3d_sparkPlans (default: the only one)")
    p.add_argument("-tr", default="SSLFinetuneTrainer", help="trainer class (default SSLFinetuneTrainer)")
    p.add_argument("-f", nargs="+", default=["0"], type=V.fold, help="folds to ensemble (default 0)")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("extra", nargs="*", help="after --: passed to nnUNetv2_predict")
    return p


def _run(args: argparse.Namespace) -> int:
    V.require_env("nnUNet_results")  # where the fine-tuned model is looked up
    V.check_writable(args.o)
    src = Path(args.i)
    if not src.is_dir():
        raise BadInputError(src, "input folder does not exist")
    if not any(src.glob("*_0000.*")):
        raise BadInputError(src, "no images named <case>_0000.<ext> (nnU-Net's channel naming)")
    dataset = nnunet_dataset_name(args.d)
    folder, plans = resolve_model(dataset, args.tr, args.p)
    V.check_device(args.device)
    dj = model_dataset_json(folder)  # every input image through ssl3d's readers before nnU-Net predicts
    check_prediction_folder(src, dj.get("channel_names", dj.get("modality")), dj["file_ending"], os.cpu_count() or 1)
    from ssl3d.training.checkpoints import read_checkpoint

    for f in args.f:
        ckpt = folder / (f"fold_{f}" if f != "all" else "fold_all") / args.chk
        if not ckpt.is_file():
            raise BadInputError(ckpt, "checkpoint missing (training not finished for this fold?)")
        read_checkpoint(ckpt)  # truncated or foreign files: one line here, not a traceback from nnU-Net
    cmd = ["nnUNetv2_predict", "-i", str(src), "-o", args.o, "-d", dataset, "-c", "3d_fullres", "-p", plans,
           "-tr", args.tr, "-f", *args.f, "-chk", args.chk, "-device", args.device, *args.extra]
    return run_nnunet(cmd)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)
