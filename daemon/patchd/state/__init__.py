"""The state layer: everything patchd knows about this host, on disk.

It holds the state of every build (``builds/R/N/state.json``), the boot pointers
(``pointers.json``) and the ``current`` link, all owned by :class:`Lifecycle`; this
host's identity and the last manifest it accepted on each channel (``client.json``, see
:func:`load_client_state`); the operator's hold (``hold.json``, :class:`Hold`); and the
name of every path, in :class:`Layout`.

Pure and synchronous: no async, no network, nothing read but the state and cache
directories, ``release_dir/VERSION`` and ``/proc`` (is a booting host alive?). Each
call is a few small file operations (atomic writes, renames, unlinks), short enough to
run under the lifecycle's lock from the event loop or from the installer's worker
thread. That keeps every transition a plain function of what is on disk, which the
crash tests can stop at any write (:data:`FAILPOINTS`) and which start-up repairs; the
decisions that need no I/O at all (:func:`decide_download`, :func:`choose_next_boot`)
are tested without a state directory.

Modules: ``layout`` (paths), ``pointers`` (``pointers.json`` and the pure decisions),
``store`` (one file read or written), ``view`` (the queries), ``lifecycle`` (the
transitions), ``trash`` (what transitions drop, deleted outside the lock),
``recovery`` (start-up), ``client_state`` (``client.json``), ``hold``
(``hold.json``). The model
types (``Build``, the states, ``BadReason``) live in :mod:`patchd.core.model`.
"""

from patchd.state.client_state import (
    Accepted,
    ClientState,
    accepted,
    load_client_state,
    save_client_state,
)
from patchd.state.hold import Hold, read_hold, remove_hold, write_hold
from patchd.state.layout import OLD_TREE_PREFIX, DownloadFiles, Layout
from patchd.state.lifecycle import (
    FAILPOINTS,
    MAX_INSTALL_ATTEMPTS,
    WRITE_SITES,
    AliveCheck,
    EventHook,
    Lifecycle,
    ValidityCheck,
)
from patchd.state.pointers import Action, Decision, Pointers, choose_next_boot, decide_download
from patchd.state.trash import Trash
from patchd.state.view import LifecycleView

__all__ = [
    "FAILPOINTS",
    "MAX_INSTALL_ATTEMPTS",
    "OLD_TREE_PREFIX",
    "WRITE_SITES",
    "Accepted",
    "Action",
    "AliveCheck",
    "ClientState",
    "Decision",
    "DownloadFiles",
    "EventHook",
    "Hold",
    "Layout",
    "Lifecycle",
    "LifecycleView",
    "Pointers",
    "Trash",
    "ValidityCheck",
    "accepted",
    "choose_next_boot",
    "decide_download",
    "load_client_state",
    "read_hold",
    "remove_hold",
    "save_client_state",
    "write_hold",
]
