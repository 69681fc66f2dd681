"""The ``patchd`` command: parsing, dispatch and the one-line error rule.

``main`` parses and dispatches (each command imported only when run, so ``patchd
status`` stays quick), ``client`` holds the commands that talk to a running daemon over
its socket, ``demo`` runs the whole flow in a temporary directory.
"""

from patchd.cli.main import build_parser

# ``main`` stays in patchd.cli.main (the console script's entry point): re-exporting a
# function named like the module would shadow the module for ``import patchd.cli.main``.
__all__ = ["build_parser"]
