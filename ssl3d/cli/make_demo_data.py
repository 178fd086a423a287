"""``ssl_make_demo_data``: write synthetic abdomen-like CT as nnU-Net v2 raw datasets for demos and tests."""
from __future__ import annotations

import argparse
import logging
import sys

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli
from ssl3d.data.synthetic import PHASES, SIZE_PRESETS, write_demo_datasets
from ssl3d.data.synthetic_cls import CLS_TASKS, write_classification_dataset
from ssl3d.utils import env_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl_make_demo_data",
        description="Write synthetic abdomen-like CT phantoms (HU, anisotropic spacing, random orientations) as an "
                    "unlabeled nnU-Net raw dataset for pretraining and a labeled one (liver, spleen, kidneys, aorta, "
                    "IVC, vertebrae) for fine-tuning. The same seed always gives the same data.")
    p.add_argument("-o", default=None, metavar="RAW_DIR",
                   help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("-nu", "--n-unlabeled", type=V.nonnegative_int, default=16, help="cases in the unlabeled pool (default 16)")
    p.add_argument("-nl", "--n-labeled", type=V.nonnegative_int, default=8, help="cases in the labeled set (default 8)")
    p.add_argument("--size", choices=sorted(SIZE_PRESETS), default="small",
                   help="grid size: tiny (40-56 voxels in-plane, 12-24 slices) or small (80-128, 24-64; default)")
    p.add_argument("--phase", choices=PHASES, default="native",
                   help="contrast phase: native (default) or portal-venous (enhancing liver, spleen, kidneys, vessels)")
    p.add_argument("-du", "--unlabeled-id", type=int, default=801,
                   help="dataset id of the unlabeled pool (default 801)")
    p.add_argument("-dl", "--labeled-id", type=int, default=802, help="dataset id of the labeled set (default 802)")
    p.add_argument("--unlabeled-name", default="SynthCTPool", help="dataset name of the unlabeled pool")
    p.add_argument("--labeled-name", default="SynthCTOrgans", help="dataset name of the labeled set")
    p.add_argument("--classification", choices=sorted(CLS_TASKS), default=None,
                   help="also write a case-classification dataset (fatty-liver: liver 30-60 HU darker in about half "
                        "the cases; fatty-liver-easy: 150-200 HU darker, a sanity check; classes in cases.csv and "
                        "dataset.json)")
    p.add_argument("-nc", "--n-classification", type=V.positive_int, default=16,
                   help="cases in the classification dataset (default 16)")
    p.add_argument("-dc", "--classification-id", type=int, default=803,
                   help="dataset id of the classification dataset (default 803)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _run(args: argparse.Namespace) -> int:
    raw_dir = args.o or env_dir("nnUNet_raw")
    if raw_dir is None:
        raise SystemExit("ssl_make_demo_data: error: no output folder: pass -o RAW_DIR or set $nnUNet_raw")
    try:
        folders = write_demo_datasets(raw_dir, seed=args.seed, n_unlabeled=args.n_unlabeled,
                                      n_labeled=args.n_labeled, size=args.size, unlabeled_id=args.unlabeled_id,
                                      labeled_id=args.labeled_id, unlabeled_name=args.unlabeled_name,
                                      labeled_name=args.labeled_name, progress=not args.no_progress,
                                      phase=args.phase)
        if args.classification:
            folders["classification"] = write_classification_dataset(
                raw_dir, args.classification, args.n_classification, args.seed, args.size, args.classification_id,
                phase=args.phase, progress=not args.no_progress)
    except OSError as e:  # unwritable folder, full disk: one line, not a traceback
        raise SystemExit(f"ssl_make_demo_data: error: {e}") from None
    log = logging.getLogger("ssl3d")
    if not folders:
        log.warning("nothing to write: both --n-unlabeled and --n-labeled are 0")
    for key, folder in folders.items():
        log.info("%s dataset: %s", key, folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
