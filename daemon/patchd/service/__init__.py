"""The daemon of one app: who runs what, when, and how the outside world reaches it.

``daemon`` wires the parts and owns every task; ``jobs`` is the one owner of every job
that changes state (updates, installs, rollbacks) and the source of the activity
board; ``checks`` polls and answers CheckNow; ``updater`` carries out one update
(decide, fetch, install, promote, report); ``boot`` keeps the boot protocol and
``strict`` its strict verification (shared, kept until a tree changes); ``api``
maps the varlink interface onto a narrow protocol of the daemon; ``events`` queues and
sends fleet events; ``schedule`` holds the pure timing rules.
"""

from typing import Any

__all__ = ["Daemon", "run_command"]


def __getattr__(name: str) -> Any:
    """Import the daemon only when asked: the CLI imports ``service.interface`` and must
    not pay for httpx, cryptography and the whole daemon on every ``patchd status``."""
    if name in __all__:
        from patchd.service import daemon

        return getattr(daemon, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
