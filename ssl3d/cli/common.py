"""What every ssl3d command shares: logging set-up and turning bad input into one line and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ssl3d.utils import BadInputError, BadInputs

EXIT_BAD_INPUT = 2


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
