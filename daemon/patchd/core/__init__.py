"""The bottom layer: the words every other layer speaks.

``model`` (builds, build states, bad reasons, release ordering), ``errors`` (every
error class patchd raises on purpose, and the table routing them to the socket and the
CLI) and ``fsio`` (atomic, durable writes; safe paths). No I/O policy lives here, and
nothing here imports another layer.
"""

from patchd.core import errors, fsio, model

__all__ = ["errors", "fsio", "model"]
