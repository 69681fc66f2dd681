"""The bottom layer: the words every other layer speaks.

``model`` (builds, build states, bad reasons, release ordering), ``errors`` (every
error class patchd raises on purpose), ``error_table`` (how each leaves patchd: on the
socket and as the CLI's line), ``fsio`` (atomic, durable writes; safe paths), ``text``
(outside text made safe to echo) and ``documents`` (outside JSON, bounded). No
I/O policy lives here, and nothing here imports another layer.
"""

from patchd.core import documents, error_table, errors, fsio, model, text

__all__ = ["documents", "error_table", "errors", "fsio", "model", "text"]
