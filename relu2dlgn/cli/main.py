"""``relu2dlgn COMMAND ...``: the one place that parses argv. Each command is a module of this package with
``add_parser(subparsers)`` and ``run(args) -> exit code``; library code logs, this package prints."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..errors import Relu2DlgnError
from . import experiment, explain, export, finetune, inspect, run

COMMANDS = (run, inspect, finetune, export, explain, experiment)


class _TqdmHandler(logging.Handler):
    """Log records on stderr without breaking a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - never let logging kill a run
            self.handleError(record)


def configure_logging(verbosity: int) -> None:
    """relu2dlgn's loggers → stderr (INFO by default; ``-q``: warnings only; ``-v``: debug)."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger = logging.getLogger("relu2dlgn")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _TqdmHandler)]
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relu2dlgn", description="Convert ReLU networks into DLGNs, fine-tune, "
                                                                   "export and read them.")
    parser.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                        help="print warnings and results only")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, help="debug output")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a relu2dlgn error is one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbosity)
    try:
        return args.func(args)
    except Relu2DlgnError as exc:
        print(f"relu2dlgn {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
