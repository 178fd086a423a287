"""``ssl_benchmark``: the label-efficiency curve in one command.

``ssl_benchmark -u 801 -l 802 -m spark hyspark --scratch --n-train 1 2 all --seeds 3 -device cpu -o bench/``
pretrains each method once on the pool (or takes finished results with ``-p spark=/path``), fine-tunes every
(method | scratch) × label count × seed with stock nnU-Net on the same plans, schedule and seed-matched nested
few-shot subsets, predicts a fixed held-out test set that no arm trains on (``--test``, or a seeded third of the
labeled cases) and scores it with nnU-Net's evaluation. Writes ``results.json``, ``results.md`` and
``label_efficiency.png`` to ``-o``. A killed run resumes where it stopped (each step's result is written last);
a failed arm is reported with its log and the others go on.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ssl3d.cli.common import run_cli
from ssl3d.evaluation.protocol import PRESETS
from ssl3d.training.methods import available_methods
from ssl3d.utils import BadInputError

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-u", required=True, metavar="POOL", help="preprocessed unlabeled pool (id or name)")
    p.add_argument("-l", required=True, metavar="DATASET", help="labeled nnU-Net raw dataset (id or name)")
    p.add_argument("-m", nargs="+", required=True, choices=sorted(available_methods()), metavar="METHOD",
                   help=f"methods: {', '.join(sorted(available_methods()))}")
    p.add_argument("-o", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("-p", nargs="*", default=[], metavar="METHOD=PATH",
                   help="finished pretraining results to use instead of pretraining")
    p.add_argument("--scratch", action="store_true", help="add the same networks trained from scratch")
    p.add_argument("--n-train", nargs="+", default=["1", "2", "all"], help="labeled training cases per arm")
    p.add_argument("--seeds", type=int, default=2, help="seeds per (method, label count)")
    p.add_argument("--test", default=None, help="held-out test set: raw dataset folder or folder with images/labels")
    p.add_argument("--test-fraction", type=float, default=1 / 3,
                   help="without --test: fraction of labeled cases held out (seeded, at least one)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("-np", type=int, default=2, help="processes for nnU-Net's preprocessing")
    g = p.add_argument_group("preset overrides")
    for key, kind in (("pretrain_epochs", int), ("pretrain_iters", int), ("ft_epochs", int), ("ft_iters", int),
                      ("ft_lr", float), ("encoder_lr_factor", float)):
        g.add_argument("--" + key.replace("_", "-"), type=kind, default=None, dest=key)
    g.add_argument("--size", default=None, help="architecture preset of the methods (tiny, planned/S, ...)")
    g.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
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
        if not sep or not Path(path).is_dir():
            raise BadInputError(path or item, "expected METHOD=existing pretraining results folder")
        out[method] = Path(path)
    return out


def _run(args: argparse.Namespace) -> int:
    from ssl3d.evaluation.runner import BenchmarkConfig, run_benchmark

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BadInputError(None, "CUDA is not available; use -device cpu")
    overrides = {k: getattr(args, k) for k in ("pretrain_epochs", "pretrain_iters", "ft_epochs", "ft_iters", "ft_lr",
                                               "encoder_lr_factor", "size", "patch_size", "warmup",
                                               "optimizer")}
    cfg = BenchmarkConfig(pool=args.u, labeled=args.l, methods=list(args.m), output=Path(args.o),
                          scratch=args.scratch, n_train=list(args.n_train), seeds=args.seeds, preset=args.preset,
                          device=args.device, test=Path(args.test) if args.test else None,
                          test_fraction=args.test_fraction, pretrained=_pretrained(args.p),
                          num_processes=args.np, overrides=overrides, cka=args.cka,
                          progress=not args.no_progress)
    summary = run_benchmark(cfg)
    logger.info("%s", (Path(args.o) / "results.md").read_text())
    logger.info("results: %s (results.json, results.md, label_efficiency.png)", args.o)
    return 1 if summary["failures"] and not summary["arms"] else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
