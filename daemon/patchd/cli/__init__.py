"""The ``patchd`` command: parsing, dispatch and the one-line error rule.

``main`` parses and dispatches (each command imported only when run, so ``patchd
status`` stays quick), ``client`` holds the commands that talk to a running daemon over
its socket, ``demo`` runs the whole flow in a temporary directory.
"""

from patchd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
