"""``ssl_finetune_cls``: classify whole cases with a pretrained encoder (nnU-Net itself only segments).

``ssl_finetune_cls -d 803 -p <pretraining results> [--labels cases.csv] --mode finetune|scratch|linear -f 0``
transfers the pretraining plans to the labeled dataset, preprocesses it, trains the encoder + pooling + linear
head on the fold's (budget of) training cases, and scores the fold's held-out cases by whole-volume sliding
window: predictions.csv, metrics.json (AUC, balanced accuracy, per-class F1), confusion_matrix.png,
cls_results.json. See :mod:`ssl3d.evaluation.classification`.
"""
from __future__ import annotations

import argparse
import sys

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli
from ssl3d.utils import DEFAULT_SEED, BadInputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_finetune_cls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="nnU-Net raw dataset with case labels (id, name or path)")
    p.add_argument("-p", required=True, help="pretraining results folder (<Trainer>__ssl3dPlans__3d_fullres)")
    p.add_argument("--labels", default=None, help="CSV 'case_id,label' (default: dataset.json ssl3d_case_labels)")
    p.add_argument("-f", type=V.nonnegative_int, default=0, help="stratified fold (default 0)")
    p.add_argument("--mode", choices=["finetune", "scratch", "linear"], default="finetune")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--epochs", type=V.positive_int, default=20)
    p.add_argument("--iters", type=V.positive_int, default=20, help="iterations per epoch")
    p.add_argument("--lr", type=V.positive_float, default=1e-4,
                   help="peak AdamW learning rate (head; encoder x factor)")
    p.add_argument("--batch-size", type=V.positive_int, default=2)
    p.add_argument("--encoder-lr-factor", type=V.nonnegative_float, default=1.0)
    p.add_argument("--layer-decay", type=V.open_unit, default=None,
                   help="layer-wise LR decay over encoder blocks, e.g. 0.75")
    p.add_argument("--class-balanced", action="store_true", help="inverse-frequency class weights in the loss")
    p.add_argument("--dropout", type=V.nonnegative_float, default=0.0)
    crop = p.add_mutually_exclusive_group()
    crop.add_argument("--crop", choices=["patch", "case"], default="patch",
                      help="training crop = scoring tile: the planned patch (default) or the whole case (the largest "
                           "preprocessed case rounded up to the network's stride; small volumes only)")
    crop.add_argument("--crop-size", type=V.positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                      help="an explicit training crop = scoring tile (a multiple of the network's stride)")
    p.add_argument("--augment", choices=["mirror", "nnunet"], default="mirror",
                   help="training augmentation: mirroring on all axes (default) or nnU-Net's training transforms "
                        "(rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma, mirroring)")
    p.add_argument("--disable_tta", "--disable-tta", dest="disable_tta", action="store_true",
                   help="score held-out cases without test-time mirroring (default: logits averaged over the "
                        "training mirrorings, as nnUNetv2_predict does)")
    p.add_argument("--l2", type=V.nonnegative_float, default=1e-2,
                   help="linear mode: L2 penalty of the logistic regression")
    p.add_argument("--embedding-cache", default=None,
                   help="linear mode: folder of cached case embeddings, shared by probes of the same encoder "
                        "(default: embeddings/ next to the fold folders)")
    p.add_argument("--val-fraction", type=V.share, default=0.2,
                   help="share of the label budget used for selection (0: none)")
    shots = p.add_mutually_exclusive_group()
    shots.add_argument("--n-train", type=V.positive_int, default=None,
                       help="label budget: N cases of the fold (stratified)")
    shots.add_argument("--fraction", type=V.unit_fraction, default=None,
                       help="label budget: this fraction of the fold")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="label budget, init, data order (default %(default)s)")
    p.add_argument("--c", action="store_true", help="continue from checkpoint_final/latest")
    V.add_overwrite(p)
    p.add_argument("-np", type=V.positive_int, default=1, help="preprocessing processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _run(a: argparse.Namespace) -> int:
    from ssl3d.evaluation.classification import ClsOptions, run_classification

    V.require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    V.check_device(a.device)
    if a.c and a.overwrite:
        raise BadInputError(None, "--c and --overwrite exclude each other")
    V.check_writable(V.env_dir("nnUNet_preprocessed"))
    V.check_writable(V.env_dir("nnUNet_results"))
    run_classification(ClsOptions(
        dataset=a.d, pretraining=a.p, labels_csv=a.labels, fold=a.f, mode=a.mode, epochs=a.epochs, iters=a.iters,
        lr=a.lr, batch_size=a.batch_size, device=a.device, fraction=a.fraction, n_train=a.n_train, seed=a.seed,
        val_fraction=a.val_fraction, encoder_lr_factor=a.encoder_lr_factor, layer_decay=a.layer_decay,
        class_balanced=a.class_balanced, dropout=a.dropout, l2=a.l2, continue_training=a.c, num_processes=a.np,
        progress=not a.no_progress, embedding_cache=a.embedding_cache, overwrite=a.overwrite, crop=a.crop,
        crop_size=tuple(a.crop_size) if a.crop_size else None, augment=a.augment, tta=not a.disable_tta))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
