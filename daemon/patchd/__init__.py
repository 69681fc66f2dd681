"""patchd: signed, atomic, crash-safe updates for one application, with automatic rollback."""

__version__ = "0.1.0"
