"""``ssl_pretrain``: pretrain an encoder on a preprocessed pool (-d) or on raw folders (-i, planned first)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ssl3d.cli.common import run_cli
from ssl3d.cli import validate as V
from ssl3d.training.method_names import method_descriptions
from ssl3d.utils import DEFAULT_SEED, BadInputError, env_dir, read_json, read_json_input

logger = logging.getLogger("ssl3d")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl_pretrain",
                                description="Self-supervised pretraining inside nnU-Net's trainer machinery.")
    src = p.add_argument_group("data")
    src.add_argument("-d", default=None, metavar="DATASET", help="preprocessed pool (id or DatasetXXX_Name)")
    src.add_argument("-i", nargs="+", default=[], metavar="PATH",
                     help="raw folders: plan and preprocess first (finished work is reused), then train")
    src.add_argument("-od", default=None, help="with -i: pool dataset id/name (default Dataset900_SSLPool)")
    src.add_argument("-np", type=V.positive_int, default=4, help="with -i: preprocessing processes")
    src.add_argument("-p", default="ssl3dPlans", help="plans identifier (default ssl3dPlans)")
    p.add_argument("-m", "--method", required=True, choices=sorted(method_descriptions()), metavar="METHOD",
                   help="SSL method: " + "; ".join(f"{k}: {v}" for k, v in method_descriptions().items()))
    p.add_argument("-f", "--fold", default="0", type=V.fold,
                   help="0..n: hold out a seeded 5%% for validation; 'all': none")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_train")
    p.add_argument("--c", action="store_true",
                   help="continue from the newest readable checkpoint (a finished run: only with more --epochs)")
    V.add_overwrite(p, "an existing (finished or unfinished) pretraining of this fold")
    p.add_argument("--epochs", type=V.positive_int, default=None)
    p.add_argument("--iters", type=V.positive_int, default=None, help="iterations per epoch")
    p.add_argument("--val-iters", type=V.nonnegative_int, default=None, help="validation iterations per epoch")
    p.add_argument("--batch-size", type=V.positive_int, default=None, help="global batch size (split across DDP ranks)")
    p.add_argument("--patch-size", type=V.positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="training patch (transposed axis order as in the plans)")
    p.add_argument("--mask-ratio", type=V.open_unit, default=None)
    p.add_argument("--lr", type=V.positive_float, default=None,
                   help="peak learning rate (default: the method's, see README)")
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
    p.add_argument("--method-kwargs", type=V.json_object, default=None, help="JSON dict of extra method arguments")
    p.add_argument("--save-every", type=V.positive_int, default=None)
    p.add_argument("--preview-every", type=V.nonnegative_int, default=None, help="0: no previews")
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
    """Check every option, resolve the pool, apply CLI overrides to the plans, set up DDP if launched by torchrun,
    build the trainer (and load the checkpoint to continue from with ``--c``). None when ``--c`` finds the run
    finished and no more epochs were asked for: nothing to do, nothing written."""
    import torch

    from ssl3d.training.pretraining import pretrainer_class
    from ssl3d.training.methods import get_method_spec

    V.require_env("nnUNet_preprocessed", "nnUNet_results")
    V.check_device(args.device)
    V.check_sparse_backend(args.backend, args.device)
    if args.c and args.overwrite:
        raise BadInputError(None, "--c and --overwrite exclude each other")
    if args.i:  # the pool is planned and written there first
        V.check_writable(env_dir("nnUNet_preprocessed"))
    pool = _prepare_pool(args)
    plans_file = pool / f"{args.p}.json"
    for f in (plans_file, pool / "dataset.json", pool / "dataset_fingerprint.json"):
        if not f.is_file():
            raise BadInputError(f, "missing; run ssl_plan_and_preprocess first")
    plans = read_json_input(plans_file, "the pool's plans")
    dataset_json = read_json_input(pool / "dataset.json", "the pool's dataset.json")
    from ssl3d.preprocessing.pipeline import check_pool_complete

    check_pool_complete(pool, plans)  # a killed or outdated preprocessing is refused, not trained on
    config = plans["configurations"]["3d_fullres"]
    if args.batch_size:
        config["batch_size"] = args.batch_size
    V.check_patch_size(args.patch_size, config)
    if args.patch_size:
        config["patch_size"] = list(args.patch_size)
    _check_memory_options(args, config)
    kwargs = dict(args.method_kwargs or {})
    if args.size:
        kwargs["size"] = args.size
    meta_net = V.check_method_options(args.method, plans, config, len(dataset_json.get("channel_names", {"0": ""})),
                                      kwargs)
    fold_dir = env_dir("nnUNet_results") / pool.name / \
        f"{get_method_spec(args.method).trainer_name}__{plans['plans_name']}__3d_fullres" / f"fold_{args.fold}"
    if not args.c and not args.overwrite:
        V.refuse_finished(fold_dir, unfinished_too=True)
    V.check_writable(fold_dir, "results folder")
    resume = _checkpoint_to_continue(fold_dir, args) if args.c else None
    if resume is not None:
        V.check_checkpoint_fits(meta_net, resume[1]["network_weights"], resume[0],
                                f"-m {args.method} {json.dumps(kwargs)}")
    if resume is not None and resume[2]:
        logger.info("already finished: %s (pass more --epochs with --c to continue, or --overwrite to start over)",
                    resume[0])
        return None
    _maybe_init_distributed(args.device)
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = pretrainer_class(args.method)(plans, "3d_fullres", fold, dataset_json, torch.device(args.device))
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
    trainer.method_kwargs = kwargs
    if args.overwrite:  # the old run's checkpoints go now: a killed new run must not look finished
        for old in fold_dir.glob("checkpoint_*.pth"):
            old.unlink()
    if resume is not None:
        path, ckpt, _ = resume
        if args.epochs is None and (fold_dir / "ssl_method.json").is_file():  # the run's own schedule
            trainer.num_epochs = int(read_json(fold_dir / "ssl_method.json").get("num_epochs", trainer.num_epochs))
        logger.info("continuing from %s (epoch %d)", path, ckpt["current_epoch"])
        trainer.load_checkpoint(str(path))  # a path: nnU-Net 2.8's load_checkpoint fails on a dict
    return trainer


def _checkpoint_to_continue(fold_dir: Path, args: argparse.Namespace) -> tuple[Path, dict, bool] | None:
    """``(checkpoint, its content, finished)`` for ``--c``: the newest readable one (one warning per unreadable
    one skipped); finished when it is the final checkpoint and no more epochs than it has were asked for."""
    from ssl3d.training.checkpoints import newest_readable_checkpoint

    found = newest_readable_checkpoint(fold_dir, "cuda" if args.device == "cuda" else args.device)
    if found is None:
        logger.warning("--c: no checkpoint in %s, starting from scratch", fold_dir)
        return None
    path, ckpt = found
    finished = path.name == "checkpoint_final.pth" and (args.epochs is None or args.epochs <= ckpt["current_epoch"])
    return path, ckpt, finished


def _run(args: argparse.Namespace) -> int:
    trainer = make_trainer(args)
    if trainer is None:
        return 0
    trainer.run_training()
    logger.info("pretrained checkpoint: %s", os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
