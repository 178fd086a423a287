"""``ssl_benchmark``: the label-efficiency curve in one command.

``ssl_benchmark -u 801 -l 802 -m spark hyspark --scratch --n-train 1 2 all --seeds 3 -device cpu -o bench/``
pretrains each method once on the pool (or takes finished results with ``-p spark=/path``), trains every
(method | scratch) × arm × label count × seed with stock nnU-Net on the same plans, schedule and seed-matched
nested few-shot subsets, predicts a fixed held-out test set that no arm trains on (``--test``, else
``--test-cases`` seeded cases, 12 in the small preset, or a seeded ``--test-fraction``, a third in the paper
preset) and scores every test case: Dice (nnU-Net's evaluation), normalized surface Dice and HD95 (MONAI, on the
voxel spacing). Arms (``--arms``): ``finetune`` trains the whole network; ``frozen`` keeps the encoder exactly as
loaded (pretrained, or for scratch the seed's random initialisation) and trains decoder and head only, the
frozen-encoder probe; the small preset runs both. Writes ``results.json``, ``results.md``,
``label_efficiency.png`` and ``label_efficiency_per_class.png`` to ``-o``. A killed run resumes where it stopped
(each step's result is written last); a failed arm is reported with its log and the others go on.

``ssl_benchmark --task cls -u 801 -l 803 -m spark --scratch --linear --fractions 1 0.5 0.25 0.1 0.05 --seeds 5``
is the same curve for case classification (Wolf et al.'s protocol: label fractions 100/50/25/10/5 %, 5 seeds,
mean ± sd): each method is pretrained once exactly as above, then every method (fine-tuned, and linear-probed
with ``--linear``) and ``--scratch`` × label fraction × seed runs ``ssl_finetune_cls`` (class labels from the
dataset.json's ssl3d_case_labels or ``--labels cases.csv``). Every arm scores the held-out cases of stratified
fold ``-f``; the seed draws only the (nested, stratified) label budget, the initialisation and the data order.
Tables of AUC and balanced accuracy (mean ± sd (seeds), paired difference to scratch with a 95 % interval) and
AUC vs label fraction in ``label_efficiency.png``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ssl3d.cli import validate as V
from ssl3d.cli.common import run_cli
from ssl3d.training.method_names import method_descriptions
from ssl3d.utils import BadInputError

PRESET_NAMES = ("paper", "small")  # ssl3d.evaluation.protocol.PRESETS (checked by a test; keeps --help light)
SEG_ONLY = {"n_train": "--n-train", "test": "--test", "test_fraction": "--test-fraction", "cka": "--cka",
            "warmup": "--warmup", "optimizer": "--optimizer", "arms": "--arms", "test_cases": "--test-cases"}
CLS_ONLY = {"fractions": "--fractions", "linear": "--linear", "labels": "--labels", "f": "-f", "l2": "--l2",
            "crop": "--crop"}

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-u", required=True, metavar="POOL", help="preprocessed unlabeled pool (id or name)")
    p.add_argument("--task", choices=["seg", "cls"], default="seg",
                   help="seg: nnU-Net segmentation arms (default); cls: case classification arms (ssl_finetune_cls)")
    p.add_argument("-l", required=True, metavar="DATASET",
                   help="labeled nnU-Net raw dataset (id or name; for cls also a path), with case labels for cls")
    p.add_argument("-m", nargs="+", required=True, choices=sorted(method_descriptions()), metavar="METHOD",
                   help=f"methods: {', '.join(sorted(method_descriptions()))}")
    p.add_argument("-o", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("-p", nargs="*", default=[], metavar="METHOD=PATH",
                   help="finished pretraining results to use instead of pretraining")
    p.add_argument("--scratch", action="store_true", help="add the same networks trained from scratch")
    p.add_argument("--n-train", nargs="+", type=V.count_or_all, default=None, help="seg: labeled training cases per arm (default 1 2 all)")
    p.add_argument("--seeds", type=V.positive_int, default=None,
                   help="seeds per (method, label count | fraction) (default 3 for seg, 5 for cls)")
    p.add_argument("--test", default=None,
                   help="seg: held-out test set: raw dataset folder or folder with images/labels")
    p.add_argument("--test-fraction", type=V.open_unit, default=None,
                   help="seg, without --test: fraction of labeled cases held out (seeded, at least one; default: "
                        "the preset's --test-cases, else 1/3)")
    p.add_argument("--test-cases", type=V.positive_int, default=None,
                   help="seg, without --test: number of labeled cases held out (seeded; small preset: 12)")
    p.add_argument("--arms", nargs="+", choices=["finetune", "frozen"], default=None,
                   help="seg: finetune (whole network) and/or frozen (encoder kept as loaded, decoder and head "
                        "trained) arms per method and scratch (default: small preset both, paper finetune)")
    c = p.add_argument_group("classification (--task cls)")
    c.add_argument("--fractions", type=V.unit_fraction, nargs="+", default=None,
                   help="label budgets as fractions of the fold's training cases (default 1 0.5 0.25 0.1 0.05)")
    c.add_argument("--linear", action="store_true", help="also a linear probe on the frozen encoder per method")
    c.add_argument("--crop", choices=["patch", "case"], default=None,
                   help="training crop = scoring tile of the finetune/scratch arms (ssl_finetune_cls --crop; "
                        "preset: patch)")
    c.add_argument("--labels", default=None, help="CSV 'case_id,label' (default: dataset.json ssl3d_case_labels)")
    c.add_argument("-f", type=V.nonnegative_int, default=None, help="stratified fold whose held-out cases are scored (default 0)")
    p.add_argument("--preset", default="small", choices=PRESET_NAMES,
                   help="small: tiny networks, short schedules (CPU); paper: planned networks, full schedules (GPU)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("-np", type=V.positive_int, default=2, help="processes for nnU-Net's preprocessing")
    g = p.add_argument_group("preset overrides")
    for key, kind in (("pretrain_epochs", V.positive_int), ("pretrain_iters", V.positive_int),
                      ("ft_epochs", V.positive_int), ("ft_iters", V.positive_int), ("ft_lr", V.positive_float),
                      ("pretrain_lr", V.positive_float), ("encoder_lr_factor", V.nonnegative_float)):
        g.add_argument("--" + key.replace("_", "-"), type=kind, default=None, dest=key)
    g.add_argument("--l2", type=V.nonnegative_float, default=None, help="cls, linear probe: L2 penalty of the logistic regression")
    g.add_argument("--size", default=None, help="architecture preset of the methods (tiny, planned/S, ...)")
    g.add_argument("--patch-size", type=V.positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    g.add_argument("--warmup", choices=["linear", "decoder"], default=None)
    g.add_argument("--optimizer", choices=["auto", "sgd", "adamw"], default=None, help="fine-tuning optimizer")
    p.add_argument("--cka", action="store_true",
                   help="feature reuse: linear CKA per stage between pretrained and fine-tuned encoders (cka.png)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _pretrained(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        method, sep, path = item.partition("=")
        if not sep or not (Path(path).is_dir() or Path(path).is_file()):
            raise BadInputError(path or item, "expected METHOD=existing pretraining results folder or checkpoint "
                                              "file (nnssl, MONAI SwinUNETR)")
        out[method] = Path(path)
    return out


def _run(args: argparse.Namespace) -> int:
    from ssl3d.evaluation.runner import BenchmarkConfig, run_benchmark

    V.check_device(args.device)
    V.check_writable(args.o)
    other = CLS_ONLY if args.task == "seg" else SEG_ONLY  # an option of the other task would be ignored silently
    given = [flag for key, flag in other.items() if getattr(args, key) is not None and getattr(args, key) is not False]
    if given:
        raise BadInputError(None, f"{given[0]} does not apply to --task {args.task}")
    if args.test_cases is not None and args.test_fraction is not None:
        raise BadInputError(None, "--test-cases and --test-fraction exclude each other")
    if args.seeds is not None and args.seeds < 1:
        raise BadInputError(None, "--seeds must be at least 1")
    overrides = {k: getattr(args, k) for k in ("pretrain_epochs", "pretrain_iters", "pretrain_lr", "ft_epochs",
                                               "ft_iters", "ft_lr", "encoder_lr_factor", "size", "patch_size",
                                               "warmup", "optimizer", "l2", "arms", "test_cases", "crop")}
    cfg = BenchmarkConfig(pool=args.u, labeled=args.l, methods=list(args.m), output=Path(args.o),
                          scratch=args.scratch, n_train=list(args.n_train or ["1", "2", "all"]),
                          seeds=args.seeds or (5 if args.task == "cls" else 3), preset=args.preset,
                          device=args.device, test=Path(args.test) if args.test else None,
                          test_fraction=args.test_fraction,
                          pretrained=_pretrained(args.p), num_processes=args.np, overrides=overrides, cka=args.cka,
                          progress=not args.no_progress, task=args.task,
                          fractions=list(args.fractions or [1.0, 0.5, 0.25, 0.1, 0.05]), linear=args.linear,
                          labels_csv=Path(args.labels) if args.labels else None, fold=args.f or 0)
    summary = run_benchmark(cfg)
    logger.info("%s", (Path(args.o) / "results.md").read_text(encoding="utf-8"))
    logger.info("results: %s (results.json, results.md, label_efficiency*.png)", args.o)
    return 1 if summary["failures"] and not summary["arms"] else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
