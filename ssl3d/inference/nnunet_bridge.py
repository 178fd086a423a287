"""The bridge to stock nnU-Net: its commands run with ssl3d's trainer shims visible, datasets and fine-tuned
models found the way nnU-Net names them. Used by ``ssl_finetune``, ``ssl_predict`` and the benchmark."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ssl3d.inference.process_guard import LOCK_FDS_ENV, run_guarded
from ssl3d.utils import BadInputError, env_dir

logger = logging.getLogger(__name__)

EXT_DIR = Path(__file__).resolve().parent.parent / "nnunet_ext"


def ext_trainer_path() -> str:
    """``nnUNet_extTrainer`` value with ssl3d's shim folder added to whatever the user already has."""
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    return os.pathsep.join([str(EXT_DIR)] + [p for p in current if p != str(EXT_DIR)])


def run_nnunet(cmd: list[str], env_defaults: dict | None = None, dry_run: bool = False,
               log_file: str | os.PathLike | None = None, env_overrides: dict | None = None,
               pass_fds: Sequence[int] = ()) -> int:
    """Run a stock nnU-Net (or ssl3d) command from this environment's bin folder with ssl3d's trainer shims
    visible. ``env_defaults`` yield to the user's environment, ``env_overrides`` win over it; ``log_file``:
    stdout and stderr are appended there instead of going to the console. The command runs under
    :mod:`~ssl3d.inference.process_guard` (own process group, ended with this process, also on ``kill -9``);
    ``pass_fds`` (an owner lock) are inherited by it and by the guarded commands it starts in turn."""
    env = {**(env_defaults or {}), **os.environ, **(env_overrides or {}), "nnUNet_extTrainer": ext_trainer_path()}
    say = logger.info if log_file is None else logger.debug  # with a log file the command goes there
    say("export nnUNet_extTrainer=%s", env["nnUNet_extTrainer"])
    say("%s", " ".join(cmd))
    if dry_run:
        return 0
    bin_dir = Path(sys.executable).parent
    exe = str(bin_dir / cmd[0]) if (bin_dir / cmd[0]).exists() else cmd[0]
    inherited = [int(f) for f in os.environ.get(LOCK_FDS_ENV, "").split(",") if f]
    fds = sorted(set(pass_fds) | set(inherited))
    if log_file is None:
        return run_guarded([exe, *cmd[1:]], env, fds)
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        return run_guarded([exe, *cmd[1:]], env, fds, stdout=log, stderr=subprocess.STDOUT)


def nnunet_dataset_name(dataset: str | int) -> str:
    """``DatasetXXX_Name`` for an id or name, as nnU-Net resolves it (raw, preprocessed or results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else str(dataset))
    except RuntimeError as e:
        raise BadInputError(None, f"dataset {dataset}: {str(e).splitlines()[0]}") from None


def resolve_model(dataset: str, trainer: str, plans: str | None) -> tuple[Path, str]:
    """The fine-tuned results folder ``<trainer>__<plans>__3d_fullres`` and its plans identifier."""
    root = env_dir("nnUNet_results")
    if root is None:
        raise BadInputError(None, "set nnUNet_results (the folder ssl_finetune trained into)")
    base = root / dataset
    if plans is not None:
        folder = base / f"{trainer}__{plans}__3d_fullres"
        if not folder.is_dir():
            raise BadInputError(folder, "no fine-tuned model here (check -d, -p and -tr)")
        return folder, plans
    found = sorted(base.glob(f"{trainer}__*__3d_fullres")) if base.is_dir() else []
    if not found:
        raise BadInputError(base, f"no {trainer} results for this dataset; run ssl_finetune first")
    if len(found) > 1:
        names = ", ".join(f.name.split("__")[1] for f in found)
        raise BadInputError(base, f"several fine-tuned plans ({names}); choose one with -p")
    return found[0], found[0].name.split("__")[1]
