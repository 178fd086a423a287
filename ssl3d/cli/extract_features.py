"""``ssl_extract_features``: embeddings (and optionally stage feature maps) of images from a pretrained encoder.

``ssl_extract_features -p <pretraining results> -i images/ -o feats/`` preprocesses every image like the
pretraining pool (plans of the results folder), runs the encoder densely by a 50 %-overlap sliding window of
the trained patch size and writes per case ``feats/<case>.npz`` (``embedding``: image-weighted global average
of the deepest stage; with ``--stages`` also ``stage_0``, ``stage_1``, ... stitched over the whole image),
plus ``feats/embeddings.npz`` (``case_ids``, ``embeddings`` matrix) and ``feats/features.json``. Images are
nnU-Net-named (``<case>_0000.nii.gz`` ...) or plain single-channel files (.nii.gz, .nrrd, .mha, DICOM).
Rerunning skips cases whose npz exists (``--overwrite`` redoes them).
"""
from __future__ import annotations

import argparse
import logging

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_extract_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", required=True, help="pretraining results folder (<Trainer>__ssl3dPlans__3d_fullres)")
    p.add_argument("-i", required=True, help="folder of images (or one image file)")
    p.add_argument("-o", required=True, help="output folder for the features")
    p.add_argument("-f", default="0", type=V.fold, help="fold of the pretraining (default 0)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--stages", action="store_true", help="also save every stage's feature map of the whole image")
    p.add_argument("--overwrite", action="store_true", help="recompute cases that already have features")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    # imported here so --help and argument errors stay fast (torch, nnU-Net)
    from ssl3d.inference.features import extract_features

    V.check_device(args.device)
    V.check_writable(args.o, "features folder")
    res = extract_features(args.p, args.i, args.o, stages=args.stages, device=args.device, fold=args.f,
                           overwrite=args.overwrite, progress=not args.no_progress)
    logger.info("%s: %d cases, embedding dim %d (%s, stage channels %s)", args.o, res["num_cases"],
                res["embedding_dim"], res["method"], res["stage_channels"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
