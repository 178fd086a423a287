"""``ssl_plan_and_preprocess``: fingerprint, plan and preprocess unlabeled scans for pretraining."""
from __future__ import annotations

import argparse
import logging
import sys

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl_plan_and_preprocess",
        description="Fingerprint, plan and preprocess unlabeled 3D scans (nnU-Net raw datasets and/or plain "
                    "folders of NIfTI/NRRD/MHA/DICOM, nnssl pretrain_data.json manifests) into one pretraining pool under $nnUNet_preprocessed.")
    p.add_argument("-d", nargs="+", default=[], metavar="DATASET",
                   help="nnU-Net raw dataset ids or names under $nnUNet_raw (labels are ignored)")
    p.add_argument("-i", nargs="+", default=[], metavar="PATH",
                   help="folders searched recursively for .nii/.nii.gz/.nrrd/.mha/.mhd files and DICOM series")
    p.add_argument("--manifest", nargs="+", default=[], metavar="JSON",
                   help="nnssl pretrain_data.json manifests (one collection each; $VAR paths from the environment, "
                        "relative ones from the manifest's folder; anatomy masks become the body mask)")
    p.add_argument("-o", default=None, metavar="FOLDER", help="output root instead of $nnUNet_preprocessed")
    p.add_argument("-od", default=None, metavar="DATASET",
                   help="output dataset, e.g. 950 or Dataset950_MyPool (default: the single -d input's name, "
                        "else Dataset900_SSLPool)")
    p.add_argument("-np", type=V.positive_int, default=4, help="processes for fingerprint and preprocessing (default 4)")
    p.add_argument("--spacing", type=V.positive_float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="force the target spacing in mm (numpy order z y x), e.g. 1.5 1.5 1.5")
    p.add_argument("--patch-size", type=V.positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="force the patch size (rounded up to the network's divisibility)")
    p.add_argument("--patch-voxels", type=V.positive_int, default=None,
                   help="voxel budget for the planned patch (default 128^3 = 2097152)")
    p.add_argument("--mask-cell-size", type=V.positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="mask cell in voxels (default: the encoder's total stride)")
    p.add_argument("--mask-ratio", type=V.open_unit, default=0.75, help="default mask ratio stored in the plans")
    p.add_argument("--ct-window", type=V.finite_float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="normalize CT with a fixed window to [0,1] (e.g. -175 250) instead of nnU-Net's CT scheme")
    p.add_argument("--modality", choices=["CT", "MRI"], default=None,
                   help="override the modality from dataset.json / intensity inference")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unusable cases (listed in skipped_cases.json) instead of stopping")
    p.add_argument("--verify", action="store_true", help="re-read every preprocessed output at the end")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _run(args: argparse.Namespace) -> int:
    if not args.d and not args.i and not args.manifest:
        raise SystemExit("ssl_plan_and_preprocess: error: give at least one input with -d, -i and/or --manifest")
    V.check_window(args.ct_window)  # before anything is planned or written
    if args.o is None:
        V.require_env("nnUNet_preprocessed")
    V.check_writable(args.o or V.env_dir("nnUNet_preprocessed"))
    from ssl3d.preprocessing.pipeline import PlanOptions, plan_and_preprocess

    options = PlanOptions(datasets=args.d, folders=args.i, manifests=args.manifest, output_root=args.o, output_dataset=args.od,
                          num_processes=max(1, args.np), spacing=args.spacing, patch_size=args.patch_size,
                          patch_voxels=args.patch_voxels, mask_cell_size=args.mask_cell_size,
                          mask_ratio=args.mask_ratio, ct_window=args.ct_window, modality=args.modality,
                          skip_bad=args.skip_bad, verify=args.verify, progress=not args.no_progress)
    result = plan_and_preprocess(options)
    log = logging.getLogger("ssl3d")
    log.info("pool: %d cases (%d preprocessed now, %d already done, %d skipped)", len(result.case_ids),
             len(result.preprocessed_now), len(result.already_done), len(result.skipped))
    if result.skipped:
        log.warning("skipped cases are listed in %s", result.dataset_dir / "skipped_cases.json")
    log.info("plans: %s", result.plans_file)
    log.info("check the plan:\n  %s", "\n  ".join(result.summary))
    log.info("preprocessed data: %s", result.data_dir)
    log.info("dataset for later commands: %s", result.dataset_dir.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
