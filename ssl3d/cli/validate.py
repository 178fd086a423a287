"""Checks every command runs before any work starts: option types and ranges (as argparse types, so a bad value is
argparse's one line and exit code 2), devices, writable outputs, environment variables, method options and
finished results. Everything here is light to import: torch only inside the checks that need it."""
from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ssl3d.utils import BadInputError, env_dir

# ---- argparse types ------------------------------------------------------------------------------------------


def _number(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    v = _number(int, text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(int, text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must not be negative")
    return v


def positive_float(text: str) -> float:
    v = _number(float, text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be a positive finite number")
    return v


def nonnegative_float(text: str) -> float:
    v = _number(float, text)
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be zero or a positive finite number")
    return v


def open_unit(text: str) -> float:
    """A share strictly between 0 and 1 (validation fraction, mask ratio)."""
    v = _number(float, text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1)")
    return v


def share(text: str) -> float:
    """A share in [0, 1) (0: none)."""
    v = _number(float, text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 1)")
    return v


def unit_fraction(text: str) -> float:
    """A label fraction in (0, 1]."""
    v = _number(float, text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1]")
    return v


def finite_float(text: str) -> float:
    v = _number(float, text)
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{v} must be finite")
    return v


def fold(text: str) -> str:
    """A fold: a non-negative integer or 'all' (kept as text, as nnU-Net takes it)."""
    if text == "all":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fold (an integer >= 0 or 'all')") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not a fold (an integer >= 0 or 'all')")
    return str(v)


def count_or_all(text: str) -> str:
    """A positive case count or 'all' (kept as text)."""
    return text if text == "all" else str(positive_int(text))


def json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"key\": 1}}', got {type(v).__name__}")
    return v


# ---- checks run at the start of a command body ---------------------------------------------------------------


def check_window(window: Sequence[float] | None, option: str = "--ct-window") -> None:
    if window is not None and not window[0] < window[1]:
        raise BadInputError(None, f"{option} {window[0]:g} {window[1]:g}: LO must be below HI")


def require_env(*names: str) -> None:
    missing = [n for n in names if env_dir(n) is None]
    if missing:
        raise BadInputError(None, f"environment variable {', '.join(missing)} not set (nnU-Net's folders: "
                                  f"export {' '.join(f'{n}=/path' for n in missing)})")


def check_writable(path: str | os.PathLike, what: str = "output folder") -> None:
    """The folder (or the nearest existing parent it would be created in) must be writable."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BadInputError(probe, f"is a file, not a folder (cannot hold the {what} {p})")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(probe, f"not writable (permission denied; {what} {p})")


def check_device(device: str) -> None:
    """``-device cuda|mps`` only where that device exists (imports torch)."""
    if device not in ("cuda", "mps"):
        return
    import torch

    ok = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    if not ok:
        raise BadInputError(None, f"-device {device}: {device.upper()} is not available on this machine; "
                                  f"use -device cpu")


def check_sparse_backend(backend: str, device: str) -> None:
    """``--backend triton`` only where the kernels can run (imports torch and triton)."""
    if backend != "triton":
        return
    import torch

    from ssl3d.sparse.ops import triton_unavailable_reason

    why = triton_unavailable_reason(torch.device(device))
    if why is not None:
        raise BadInputError(None, f"--backend triton on -device {device}: {why}; use --backend auto")


def check_patch_size(patch: Sequence[int] | None, config: dict) -> None:
    """A forced patch must be divisible by the plans' mask cell and encoder stride per axis."""
    if not patch:
        return
    ssl = config.get("ssl3d", {})
    cell, stride = ssl.get("mask_cell_size", [1, 1, 1]), ssl.get("total_stride", [1, 1, 1])
    if any(p % c or p % s for p, c, s in zip(patch, cell, stride)):
        raise BadInputError(None, f"--patch-size {' '.join(map(str, patch))}: must be divisible per axis by the "
                                  f"plans' mask cell {cell} and encoder stride {stride}")


FIXED_BUILDER_ARGS = ("plans", "configuration", "num_input_channels")


def check_method_options(method: str, plans: dict, config: dict, n_channels: int, kwargs: dict) -> Any:
    """``--size`` / ``--method-kwargs`` against the method's builder: unknown keys by its signature, then a build
    on the meta device (no memory, no weights) so a bad preset or value fails here, not after planning. Returns
    that meta-device network (None if some operation has no meta kernel)."""
    import torch

    from ssl3d.training.methods import get_method_spec

    spec = get_method_spec(method)
    params = inspect.signature(spec.builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [k for k in params if k not in FIXED_BUILDER_ARGS]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise BadInputError(None, f"--method-kwargs: unknown key(s) {', '.join(unknown)} for method '{method}' "
                                      f"(known: {', '.join(known)})")
    trial = dict(kwargs)
    if spec.sparse:
        trial["backend"] = "reference"
    try:
        with torch.device("meta"):
            return spec.build(plans, config, n_channels, **trial)
    except (TypeError, ValueError, KeyError) as e:
        opt = "--size" if "size" in str(e) and "size" in kwargs else "--method-kwargs"
        raise BadInputError(None, f"{opt}: method '{method}' refuses {json.dumps(kwargs)}: {e}") from None
    except (RuntimeError, NotImplementedError):
        return None  # an operation without a meta kernel: the real build will tell


def check_checkpoint_fits(network: Any, state: dict, path: Path, options: str) -> None:
    """A checkpoint to continue from must hold exactly ``network``'s tensors (same names and shapes)."""
    if network is None:
        return
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise BadInputError(path, f"does not match the network of {options} ({len(missing)} missing, "
                                  f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors); continue with "
                                  f"the options it was trained with, or pass --overwrite")


def refuse_finished(fold_dir: Path, continue_flag: str = "--c", overwrite_flag: str = "--overwrite",
                    unfinished_too: bool = False) -> None:
    """One line when ``fold_dir`` holds a finished result (``checkpoint_final.pth``) - or, with ``unfinished_too``,
    any checkpoint - that a plain run would overwrite."""
    final = fold_dir / "checkpoint_final.pth"
    if final.is_file():
        raise BadInputError(final, f"a finished result is here; pass {continue_flag} to continue it (more epochs) "
                                   f"or {overwrite_flag} to replace it")
    if unfinished_too:
        found = sorted(fold_dir.glob("checkpoint_*.pth"))
        if found:
            raise BadInputError(found[0], f"an unfinished run is here; pass {continue_flag} to resume it or "
                                          f"{overwrite_flag} to start over")


def add_overwrite(parser: argparse.ArgumentParser, what: str = "a finished result of this fold") -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (default: refuse)")

