"""What every ssl3d command shares: logging set-up and turning bad input into one line and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Callable

from ssl3d.utils import BadInputError, BadInputs

EXIT_BAD_INPUT = 2

# third-party warnings that tell a user nothing: (message prefix, category); also handed to child processes
# (nnUNetv2_train, multiprocessing's resource tracker) through PYTHONWARNINGS
QUIET_WARNINGS = (
    ("`torch.jit.", FutureWarning),  # deprecated torch.jit APIs used inside nnU-Net's dependencies
    ("torch.cuda.amp.GradScaler is enabled, but CUDA is not available", UserWarning),
    ("resource_tracker: There appear to be", UserWarning),  # semaphores of data-loader workers ended by a kill
)


def quiet_third_party_warnings() -> None:
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    given = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    # -W fields are split at ',' and ':', and the message field is a prefix: cut each message before either
    ours = [f"ignore:{re.split('[,:]', m)[0]}:{c.__name__}" for m, c in QUIET_WARNINGS]
    os.environ["PYTHONWARNINGS"] = ",".join(given + [w for w in ours if w not in given])


def setup_logging(verbose: bool = False) -> None:
    # force: rebind to the current stderr (commands may run several times in one process, e.g. in tests)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr,
                        force=True)
    # numexpr (pulled in by blosc2) logs its thread count at INFO: keep stderr to real messages
    logging.getLogger("numexpr").setLevel(logging.WARNING)


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
            argv: list[str] | None = None) -> int:
    """Parse, run, and map known failures to one-line messages without tracebacks."""
    args = parser.parse_args(argv)
    quiet_third_party_warnings()
    setup_logging(getattr(args, "verbose", False))
    try:
        return int(body(args) or 0)
    except BadInputError as e:
        print(f"{parser.prog}: error: {e.line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInputs as e:
        for line in e.lines:
            print(f"{parser.prog}: error: {line}", file=sys.stderr)
        print(f"{parser.prog}: {len(e.lines)} bad input(s); {e.hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
