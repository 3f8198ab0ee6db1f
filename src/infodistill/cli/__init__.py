"""Command-line interface: a thin layer that parses flags into config objects and calls the library.

Every user error is one line on stderr and exit status 2; nothing is written before the inputs are
checked, and everything written goes through a temporary file that is renamed into place.

:func:`main` is the ``infodistill`` command; every parser is in :mod:`infodistill.cli.parsers`, the handlers
of the library's commands in :mod:`infodistill.cli.commands` and those of the experiments in their modules.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from infodistill.cli.parsers import build_parser
from infodistill.config import check_seed
from infodistill.errors import UserInputError
from infodistill.files import check_output_path
from infodistill.parallel import ProcessGroupError, launched_by_torchrun

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infodistill`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --nproc re-runs the same command in each process
    handler: Callable[[argparse.Namespace], int] = args.handler
    logging.basicConfig(format="infodistill: %(levelname)s: %(message)s", level=logging.WARNING)
    from infodistill.loop import LossDiverged

    where = f"infodistill {args.command}"
    if launched_by_torchrun():
        where += f" (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})"
    try:
        _check_common_flags(args)
        return handler(args)
    except UserInputError as error:
        _error_line(f"{where}: error: {error}")
        return 2
    except (LossDiverged, ProcessGroupError) as error:
        _error_line(f"{where}: {error}")
        return 1
    except KeyboardInterrupt:
        _error_line(f"{where}: interrupted")
        return 130


FILE_OUTPUTS = {"baseline": "out", "evaluate": "out", "cmi": "ordered_grid"}
"""Per command, the flag (attribute) naming a file it writes; every other command's ``--out`` is a folder."""


def _check_common_flags(args: argparse.Namespace) -> None:
    """One boundary for what every command takes alike, checked before any work: a seed in 0..2**63-1, and an
    output (``--out``, ``--ordered-grid``) that can be written (:func:`~infodistill.files.check_output_path`)."""
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    file_flag = FILE_OUTPUTS.get(args.command)
    for name in ("out", "ordered_grid"):
        value = getattr(args, name, None)
        if value is not None:
            check_output_path(value, directory=name != file_flag, flag="--" + name.replace("_", "-"))


def _error_line(text: str) -> None:
    """``text`` as one line on stderr, in one write (lines of several processes do not interleave)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
