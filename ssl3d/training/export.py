"""Turn a pretraining result into weights stock ``nnUNetv2_train -pretrained_weights`` accepts.

nnU-Net's loader wants every key of the network (except ``.seg_layers.``) with the right shape and loads
without ``map_location``, so the export is the *full* downstream state_dict (pretrained encoder + freshly
initialised decoder) as CPU tensors. The encoder transfer is checked key by key and fails loudly: research
code that loads with ``strict=False`` and silently transfers nothing is what this guards against.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.training.checkpoints import read_checkpoint
from ssl3d.training.methods import SSLMethod, build_method, get_method_spec
from ssl3d.training.seeding import derive_seed
from ssl3d.utils import DEFAULT_SEED, BadInputError, atomic_write, read_json_input

if TYPE_CHECKING:
    from ssl3d.training.external import PretrainedSource

logger = logging.getLogger(__name__)

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")


class EncoderMismatchError(BadInputError):
    """The pretrained encoder does not fit the downstream network (one line via the CLIs, exit code 2)."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        super().__init__(path, problem)


def find_pretraining(results: str | os.PathLike, fold: str = "0") -> tuple[Path, Path]:
    """``(trainer folder with plans.json and ssl_method.json, checkpoint file)`` from a trainer or fold folder."""
    p = Path(results)
    if not p.is_dir():
        raise BadInputError(p, "pretraining results folder does not exist")
    if p.name.startswith("fold_") and ((p / "ssl_method.json").is_file() or (p.parent / "ssl_method.json").is_file()):
        folder, fold_dir = p.parent, p
    elif (p / "ssl_method.json").is_file() or (p / f"fold_{fold}" / "ssl_method.json").is_file():
        folder, fold_dir = p, p / f"fold_{fold}"
    elif (p.parent / "ssl_method.json").is_file():
        folder, fold_dir = p.parent, p
    else:
        raise BadInputError(p, "not an ssl3d pretraining results folder (no ssl_method.json)")
    for name in CHECKPOINTS:
        if (fold_dir / name).is_file():
            return folder, fold_dir / name
    raise BadInputError(fold_dir, f"no checkpoint ({', '.join(CHECKPOINTS)}) found")


def run_file(folder: Path, checkpoint: Path, name: str) -> Path:
    """A pretraining's ``ssl_method.json`` / ``plans.json``: the checkpoint's fold's own copy, else the copy shared
    by the folder's folds (results written before folds kept their own)."""
    own = Path(checkpoint).parent / name
    return own if own.is_file() else Path(folder) / name


def read_pretraining_files(folder: Path, checkpoint: Path) -> tuple[dict, dict, int]:
    """(method description, plans, input channels) of a pretraining, each file checked: one line when missing,
    broken or lacking what export needs."""
    info_file = run_file(folder, checkpoint, "ssl_method.json")
    info = read_json_input(info_file, "pretraining method description")
    if not isinstance(info, dict) or "name" not in info:
        raise BadInputError(info_file, "no method 'name' in the pretraining method description")
    try:
        get_method_spec(info["name"])
    except KeyError as e:
        raise BadInputError(info_file, str(e).strip("'\"")) from None
    plans_file = run_file(folder, checkpoint, "plans.json")
    plans = read_json_input(plans_file, "the pretraining's plans; rerun ssl_pretrain or copy them back")
    if not isinstance(plans, dict) or "3d_fullres" not in (plans.get("configurations") or {}):
        raise BadInputError(plans_file, "no 3d_fullres configuration in the plans")
    dj_file = Path(folder) / "dataset.json"
    dj = read_json_input(dj_file, "the pool's dataset.json")
    if not isinstance(dj, dict) or not dj.get("channel_names"):
        raise BadInputError(dj_file, "no channel_names")
    return info, plans, len(dj["channel_names"])


def load_pretrained_method(folder: Path, checkpoint: Path) -> tuple[SSLMethod, dict, dict]:
    """Rebuild the SSL method exactly as trained and load its weights strictly. Returns (method, plans, info)."""
    info, plans, n_channels = read_pretraining_files(folder, checkpoint)
    cfg = plans["configurations"]["3d_fullres"]
    kwargs = dict(info.get("method_kwargs", {}))
    if get_method_spec(info["name"]).sparse:
        kwargs["backend"] = "reference"  # export runs on CPU, once: the plain reference math
    state = read_checkpoint(checkpoint)["network_weights"]  # a truncated file fails before the build
    try:
        method = build_method(info["name"], plans, cfg, n_channels, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise BadInputError(run_file(folder, checkpoint, "ssl_method.json"),
                            f"cannot rebuild '{info['name']}' from its description: {e}") from None
    own = method.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise EncoderMismatchError(
            f"checkpoint does not match the '{info['name']}' network described by ssl_method.json "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong-shape keys, "
            f"e.g. {(missing + unexpected + wrong)[:2]})", checkpoint)
    method.load_state_dict(state, strict=True)
    return method, plans, info


def transfer_encoder(network: torch.nn.Module, encoder_state: dict[str, torch.Tensor]) -> int:
    """Copy pretrained encoder weights into ``network``; every key must exist with the same shape and every
    network key under the pretrained top-level modules (``encoder.*``, ``swinViT.*``) must be covered.
    Returns the number of tensors copied (checks and the coverage line: ``external.coverage``)."""
    from ssl3d.training.external.coverage import load_encoder_state

    load_encoder_state(network, encoder_state)
    return len(encoder_state)


def export_weights(results: str | os.PathLike, output: str | os.PathLike, num_classes: int = 2,
                   fold: str = "0", seed: int = DEFAULT_SEED, fmt: str = "nnunet") -> dict:
    """``fmt="nnunet"``: ``{'network_weights': full downstream state_dict}`` (CPU tensors) for
    ``nnUNetv2_train -pretrained_weights``; ``fmt="nnssl"``: an nnssl checkpoint (network weights + adaptation
    plan, see ``external/nnssl.py``). ``results``: an ssl3d results folder or a foreign checkpoint file."""
    from ssl3d.training.external import load_pretrained

    if fmt not in EXPORT_FORMATS:
        raise BadInputError(None, f"unknown export format '{fmt}' ({', '.join(EXPORT_FORMATS)})")
    source = load_pretrained(results, fold)
    if fmt == "nnssl":
        from ssl3d.training.external.nnssl import write_nnssl_checkpoint

        return {**write_nnssl_checkpoint(source, output, seed), "plans": source.plans}
    return {**write_downstream_weights(source, output, num_classes, seed), "plans": source.plans}


EXPORT_FORMATS = ("nnunet", "nnssl")


def downstream_network(source: "PretrainedSource", num_classes: int, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """The downstream network of ``source`` (its channels and patch) with the pretrained encoder loaded, checked
    key by key. The decoder's initialisation is drawn from ``seed`` (same seed, same starting weights)."""
    from ssl3d.training.external.coverage import load_encoder_state

    if not source.architecture:
        raise BadInputError(source.checkpoint, f"method '{source.method_name}' has no downstream network")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "downstream-init"))
        net = build_network_from_plans(source.architecture, source.n_channels, num_classes)
    try:
        load_encoder_state(net, source.encoder_state, f"{source.kind} {source.method_name}")
    except EncoderMismatchError as e:
        raise EncoderMismatchError(e.problem, source.checkpoint) from None
    return net


def write_downstream_weights(source: "PretrainedSource", output: str | os.PathLike, num_classes: int,
                             seed: int = DEFAULT_SEED) -> dict:
    """The downstream network with ``source``'s pretrained encoder (``external.load_pretrained``, adapted with
    ``for_downstream`` to the labeled dataset), saved for ``nnUNetv2_train -pretrained_weights``.

    nnU-Net loads every non-head key from this file, so the decoder's initialisation is decided here."""
    net = downstream_network(source, num_classes, seed)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    copied = len(source.encoder_state)
    payload = {"network_weights": state, "ssl3d": {"method": source.method_name, "kind": source.kind,
                                                   "source_checkpoint": str(source.checkpoint),
                                                   "architecture": source.architecture, "encoder_tensors": copied}}
    output = Path(output)
    atomic_write(output, lambda f: torch.save(payload, f))
    logger.info("exported %s (%d pretrained encoder tensors, %d total) from %s", output, copied, len(state),
                source.checkpoint)
    return {"file": output, "architecture": source.architecture, "method": source.method_name,
            "encoder_tensors": copied}
