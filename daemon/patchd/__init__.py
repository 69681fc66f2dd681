"""patchd: signed, atomic, crash-safe updates for one application, with automatic rollback.

The package is drawn in layers; imports only point down, and the test suite enforces
it (import-linter contracts in pyproject.toml)::

    cli                       the ``patchd`` command: client commands, demo, dispatch
    service | publisher       the daemon (job runner, updater, boot keeper, socket API,
                              events) | the publisher's pack and publish
    build | fetch             trees on disk (clone, apply, materialise, verify) |
                              repository sources and resumable verified downloads
    config                    the config file, parsed and validated
    state | trust             the host's state files (layout, lifecycle, recovery) |
                              what a host may believe (signatures, manifest, bundles,
                              the update decision)
    host                      the OS around us: journald, sd_notify, processes
    core                      vocabulary (builds, states), every error class, atomic I/O

    varlink                   the varlink protocol, server and clients; knows nothing
                              of patchd and is used by service and cli

Each subpackage names its public API in ``__all__``; docs/architecture.md tells the
contracts between them.
"""

__version__ = "0.1.0"
