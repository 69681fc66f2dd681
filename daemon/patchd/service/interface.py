"""The io.patchd.Updater varlink interface description, exactly as docs/socket.md states it.

``GetInterfaceDescription`` returns this text verbatim, so generic varlink clients
(Python ``varlink``, ``varlinkctl``) can introspect and call the daemon. It is data, not
code: the method handlers live in ``api.py`` and the protocol in ``varlink.py``.
"""

from __future__ import annotations

INTERFACE_NAME = "io.patchd.Updater"

INTERFACE_TEXT = """\
interface io.patchd.Updater

type Build (release: string, patch: int)

type BuildInfo (build: Build, state: string, reason: ?string, size: ?int)

type Activity (phase: string, build: ?Build, done: int, total: int)

type HoldInfo (reason: string, since: string)
type Activation (build: Build, policy: string, opens: ?string, closes: ?string)

method GetStatus() -> (app: string, channel: string, release: string,
  next_boot: Build, last_booted: ?Build, currently_booting: ?Build,
  builds: []BuildInfo, activity: Activity,
  last_check: ?string, next_check: ?string, last_error: ?string,
  hold: ?HoldInfo, activation: ?Activation)
method GetMetrics() -> (text: string)
method GetBootTarget() -> (build: Build, path: string)
method BootStart(build: ?Build, pid: ?int) -> (build: Build, path: string)
method BootSuccess(build: ?Build) -> ()
method BootFailure(build: ?Build, reason: ?string) -> ()
method CheckNow() -> (strategy: string, build: ?Build, held: ?bool)
method Install(path: ?string, fd: ?int, hold: ?bool) -> (build: Build)
method Rollback() -> (build: Build)
method Hold(reason: ?string) -> (hold: HoldInfo)
method Unhold() -> (lifted: ?HoldInfo)
method Unmark(build: Build) -> ()
method WatchActivity() -> (activity: Activity)

error NotAuthorized (method: string)
error NotBootTarget (expected: Build, got: Build)
error Busy (activity: Activity)
error UpdateFailed (reason: string, transient: bool)
error InvalidBundle (reason: string)
error NoBootInProgress (reason: string)
error RollbackRefused (reason: string)
error StateConflict (reason: string)
error NotMarkedBad (build: Build, state: ?string)
error DowngradeRefused (build: Build, newer: Build)
"""
