"""The bottom layer: the words every other layer speaks.

``model`` (builds, build states, bad reasons, release ordering), ``errors`` (every
error class patchd raises on purpose), ``error_table`` (how each leaves patchd: on the
socket and as the CLI's line) and ``fsio`` (atomic, durable writes; safe paths). No
I/O policy lives here, and nothing here imports another layer.
"""

from patchd.core import error_table, errors, fsio, model

__all__ = ["error_table", "errors", "fsio", "model"]
