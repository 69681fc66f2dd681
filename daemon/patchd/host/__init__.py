"""The operating system around the daemon: journald, systemd notification, processes.

Thin, dependency-free adapters (``journal``, ``logs``, ``systemd``, ``process``) so the
layers above never speak a wire protocol of the host themselves, and tests can point
them at a real socket of their own.
"""

from patchd.host.logs import configure_logging
from patchd.host.process import failpoint, pid_alive, pid_start_time
from patchd.host.systemd import Notifier, watchdog_interval

__all__ = ["Notifier", "configure_logging", "failpoint", "pid_alive", "pid_start_time",
           "watchdog_interval"]
