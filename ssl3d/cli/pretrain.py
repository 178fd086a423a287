"""``ssl_pretrain``: pretrain an encoder on a preprocessed pool (-d) or on raw folders (-i, planned first)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ssl3d.cli.common import run_cli
from ssl3d.training.methods import available_methods
from ssl3d.utils import DEFAULT_SEED, BadInputError, read_json

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_pretrain",
                                description="Self-supervised pretraining inside nnU-Net's trainer machinery.")
    src = p.add_argument_group("data")
    src.add_argument("-d", default=None, metavar="DATASET", help="preprocessed pool (id or DatasetXXX_Name)")
    src.add_argument("-i", nargs="+", default=[], metavar="PATH",
                     help="raw folders: plan and preprocess first (finished work is reused), then train")
    src.add_argument("-od", default=None, help="with -i: pool dataset id/name (default Dataset900_SSLPool)")
    src.add_argument("-np", type=int, default=4, help="with -i: preprocessing processes")
    src.add_argument("-p", default="ssl3dPlans", help="plans identifier (default ssl3dPlans)")
    p.add_argument("-m", "--method", required=True, choices=sorted(available_methods()), metavar="METHOD",
                   help="SSL method: " + "; ".join(f"{k}: {v}" for k, v in available_methods().items()))
    p.add_argument("-f", "--fold", default="0", help="0..n: hold out a seeded 5%% for validation; 'all': none")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_train")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="iterations per epoch")
    p.add_argument("--val-iters", type=int, default=None, help="validation iterations per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (split across DDP ranks)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="training patch (transposed axis order as in the plans)")
    p.add_argument("--mask-ratio", type=float, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's, see README)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed for masks, initialisation, data order and augmentation (default {DEFAULT_SEED})")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "gather", "cpu", "triton"],
                   help="sparse convolution backend (spark, hyspark)")
    mem = p.add_argument_group("precision and memory")
    mem.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                     help="autocast dtype (default: bf16 on GPUs that support it, else fp16 with a gradient scaler; "
                          "off on CPU; bf16 also runs on CPU); losses are computed in fp32")
    mem.add_argument("--grad-accum", type=int, default=1, metavar="N",
                     help="split each step's batch (--batch-size, masks drawn for all of it) into N micro-batches "
                          "and accumulate their gradients: the step equals one on the whole batch for the "
                          "reconstruction methods; for contrastive methods (simclr, byol, mocov2, voco, mim's "
                          "alignment) negatives stay per micro-batch; epochs and the LR schedule count steps")
    mem.add_argument("--checkpoint-activations", action="store_true",
                     help="recompute encoder/decoder stage activations in backward (less memory, one more forward of "
                          "those stages per step; spark, hyspark, mae)")
    p.add_argument("--size", default=None, help="architecture preset of the method (e.g. tiny, S, B)")
    p.add_argument("--method-kwargs", default=None, help="JSON dict of extra method arguments")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--preview-every", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _prepare_pool(args: argparse.Namespace) -> Path:
    if args.i:
        from ssl3d.preprocessing.pipeline import PlanOptions, plan_and_preprocess

        res = plan_and_preprocess(PlanOptions(folders=args.i, output_dataset=args.od, num_processes=args.np,
                                              progress=not args.no_progress))
        return res.dataset_dir
    if not args.d:
        raise SystemExit("ssl_pretrain: error: give -d DATASET (preprocessed) or -i FOLDER (raw)")
    from ssl3d.preprocessing.pipeline import find_preprocessed_dataset

    return find_preprocessed_dataset(args.d)


def _maybe_init_distributed(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)


def _check_memory_options(args: argparse.Namespace, config: dict) -> None:
    import torch

    from ssl3d.training.methods import get_method_spec
    from ssl3d.training.optim import resolve_amp

    try:
        resolve_amp(args.amp, torch.device(args.device))
    except ValueError as e:
        raise SystemExit(f"ssl_pretrain: error: {e}") from None
    per_rank = int(config["batch_size"]) // int(os.environ.get("WORLD_SIZE", "1"))
    if args.grad_accum < 1 or per_rank % args.grad_accum:
        raise SystemExit(f"ssl_pretrain: error: --grad-accum {args.grad_accum} must be >= 1 and divide the batch "
                         f"per rank ({per_rank})")
    if args.checkpoint_activations and not get_method_spec(args.method).checkpointing:
        raise SystemExit(f"ssl_pretrain: error: --checkpoint-activations is not supported by {args.method}")


def make_trainer(args: argparse.Namespace):
    """Resolve the pool, apply CLI overrides to the plans, set up DDP if launched by torchrun, build the trainer."""
    import torch

    from ssl3d.training.pretraining import pretrainer_class

    pool = _prepare_pool(args)
    plans_file = pool / f"{args.p}.json"
    for f in (plans_file, pool / "dataset.json", pool / "dataset_fingerprint.json"):
        if not f.is_file():
            raise BadInputError(f, "missing; run ssl_plan_and_preprocess first")
    plans = read_json(plans_file)
    config = plans["configurations"]["3d_fullres"]
    if args.batch_size:
        config["batch_size"] = args.batch_size
    if args.patch_size:
        cell = config["ssl3d"]["mask_cell_size"]
        stride = config["ssl3d"]["total_stride"]
        bad = [p for p, c, s in zip(args.patch_size, cell, stride) if p % c or p % s]
        if bad:
            raise SystemExit(f"ssl_pretrain: error: --patch-size {args.patch_size} must be divisible by the mask "
                             f"cell {cell} and the encoder stride {stride}")
        config["patch_size"] = list(args.patch_size)
    if args.mask_ratio is not None:
        if not 0 < args.mask_ratio < 1:
            raise SystemExit("ssl_pretrain: error: --mask-ratio must be in (0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ssl_pretrain: error: CUDA is not available; use -device cpu")
    _check_memory_options(args, config)
    _maybe_init_distributed(args.device)
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = pretrainer_class(args.method)(plans, "3d_fullres", fold, read_json(pool / "dataset.json"),
                                       torch.device(args.device))
    for opt, attr in (("epochs", "num_epochs"), ("iters", "num_iterations_per_epoch"),
                      ("val_iters", "num_val_iterations_per_epoch"), ("lr", "initial_lr"),
                      ("save_every", "save_every"), ("preview_every", "preview_every"), ("seed", "seed")):
        if getattr(args, opt) is not None:
            setattr(trainer, attr, getattr(args, opt))
    if args.mask_ratio is not None:
        trainer.mask_ratio = args.mask_ratio  # over the method's paper ratio and the plans' default
    trainer.sparse_backend = args.backend
    trainer.amp, trainer.grad_accum = args.amp, args.grad_accum
    trainer.checkpoint_activations = args.checkpoint_activations
    trainer.show_progress = not args.no_progress
    kwargs = json.loads(args.method_kwargs) if args.method_kwargs else {}
    if args.size:
        kwargs["size"] = args.size
    trainer.method_kwargs = kwargs
    if args.c:
        ckpts = [os.path.join(trainer.output_folder, n) for n in
                 ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")]
        found = next((c for c in ckpts if os.path.isfile(c)), None)
        if found is None:
            logger.warning("--c: no checkpoint in %s, starting from scratch", trainer.output_folder)
        else:
            logger.info("continuing from %s", found)
            trainer.load_checkpoint(found)
    return trainer


def _run(args: argparse.Namespace) -> int:
    trainer = make_trainer(args)
    trainer.run_training()
    logger.info("pretrained checkpoint: %s", os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
