"""One update: check the manifest and decide; then fetch, install, promote, report.

The :class:`Updater` carries out what ``strategy.decide`` and ``Lifecycle.decide_start``
say; it never edits state files itself. :meth:`Updater.perform` reads top to bottom —
decide the start → fetch → install (materialise the tree) → promote → event — and is the
one place that decides what bad input means: a downloaded bundle whose bytes match the
signed sha256 and that turns out bad is tombstoned, for that sha256 only; bytes that do
not match the signed size and sha256 are a transport fault (``BundleHashMismatch``,
transient): discarded and retried, never tombstoned. An operator's file
(:meth:`Updater.install_local`) is only refused, or one corrupt USB stick would ban a
good patch. Other errors leave by class: a
``TransientError`` kept whatever partial data there was, a ``ConfigError`` changed
nothing.

The operator's hold (``state/hold.py``) is the updater's too: a held host decides as
always but performs nothing and forgets no server rollback; an install of a build
older than the one the host would move to by itself needs one (``install --hold``).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import anyio
import structlog

from patchd.build.install import InstallRequest, materialise
from patchd.config import Config
from patchd.core.errors import (
    BadInputError,
    BundleHashMismatch,
    DowngradeRefused,
    ManifestRootRollback,
)
from patchd.core.model import Bad, BadReason, Build, utc_now_text
from patchd.fetch.sources import Source
from patchd.service.events import EventQueue
from patchd.service.hooks import post_install
from patchd.service.metrics import Metrics
from patchd.state import (
    Action,
    ClientState,
    Hold,
    Lifecycle,
    accepted,
    read_hold,
    remove_hold,
    save_client_state,
    write_hold,
)
from patchd.trust import (
    BundleRef,
    Decision,
    HostView,
    Manifest,
    TrustedKeys,
    decide,
    rolled_back_builds,
    verify_manifest,
)
from patchd.trust.manifest import peek_root_version
from patchd.trust.root_store import RootKeeper

__all__ = ["Progress", "Updater"]

log = structlog.get_logger("patchd.service.updater")


class Progress(Protocol):
    """Where an update shows its phase (the running job, on the activity board)."""

    def show(self, phase: str, build: Build | None = None, done: int = 0,
             total: int = 0) -> None: ...

    def progress(self, done: int, total: int) -> None: ...


class Updater:
    """Checks and updates for one app; the job runner owns the tasks that call it.

    Lifecycle calls take the lifecycle's own (reentrant) lock, so multi-step reads stay
    consistent against the installer's worker thread.
    """

    def __init__(self, config: Config, lifecycle: Lifecycle, client: ClientState,
                 events: EventQueue, metrics: Metrics | None = None) -> None:
        self.config = config
        #: Counts the bundle bytes that arrive (``patchd_download_bytes_total``).
        self.metrics = metrics or Metrics()
        self.lifecycle = lifecycle
        self.client = client
        self.events = events
        self._manifest: tuple[bytes, bytes] | None = None
        #: The manifest the last check accepted, for what an install would be undone by.
        self._verified: Manifest | None = None
        self._roots: RootKeeper | None = None
        #: The operator's hold, as on disk (``hold.json``); None: not held.
        self.hold: Hold | None = read_hold(lifecycle.layout)
        if self.hold is not None:
            log.warning("hold.active", reason=self.hold.reason, since=self.hold.since)

    def __repr__(self) -> str:
        channel = self.config.server.channel
        return (f"<Updater {self.config.app.name} {channel} "
                f"serial={self.client.channel(channel).serial}>")

    @property
    def roots(self) -> RootKeeper:
        """The accepted root; made again when a reload changed the bootstrap."""
        bootstrap = self.config.trust.bootstrap
        if self._roots is None or self._roots.bootstrap != bootstrap:
            self._roots = RootKeeper(self.lifecycle.layout.root, bootstrap)
        return self._roots

    @property
    def trust(self) -> TrustedKeys:
        """The keys manifests and bundle headers must be signed by: the accepted root's."""
        return self.roots.updates_trust()

    def forget_manifest(self) -> None:
        """The next check fetches the manifest unconditionally (the source changed)."""
        self._manifest = None
        self._verified = None

    # --- check -----------------------------------------------------------------------

    async def fetch_verified(self, source: Source) -> Manifest:
        """Fetch (conditionally) and verify the manifest; persist the accepted serial."""
        # Serials are kept per channel (state/client_state.py): a switched channel
        # starts at its own record, and the old channel's record stays for a way back.
        channel = self.config.server.channel
        known = self.client.channel(channel)
        validators = known.validators if self._manifest else None
        fetched = await source.fetch_manifest(validators)
        if fetched is None and self._manifest is not None:
            data, sig = self._manifest  # 304: re-verify, it may have expired since
            new_validators = known.validators
        else:
            if fetched is None:
                fetched = await source.fetch_manifest(None)
            assert fetched is not None
            data, sig, new_validators = fetched.manifest, fetched.signature, fetched.validators
        now = datetime.now(UTC)
        # The root moves first, and only when the manifest names a newer one: an
        # unchanged poll stays one conditional GET. A refused root changes nothing.
        # Parsing and verifying up to 4 MiB of JSON, and the durable write of the
        # accepted serial, run in a worker: the event loop keeps answering the socket.
        roots, claimed = self.roots, await anyio.to_thread.run_sync(peek_root_version, data)
        await roots.advance(claimed, source.fetch_root, now)
        if claimed < roots.version:
            raise ManifestRootRollback(
                f"manifest is signed under root version {claimed}, older than the "
                f"accepted root version {roots.version} (a replayed or frozen repository)")
        roots.check_current(now)
        manifest = await anyio.to_thread.run_sync(partial(
            verify_manifest, data, sig, self.trust, app=self.config.app.name,
            channel=channel, min_serial=known.serial, same_serial_sha256=known.sha256,
            now=now))
        digest = hashlib.sha256(data).hexdigest()
        if (manifest.serial, digest, new_validators) != (
                known.serial, known.sha256, known.validators):
            self.client = accepted(self.client, channel, manifest.serial, digest, new_validators)
            await anyio.to_thread.run_sync(save_client_state, self.lifecycle.layout, self.client)
        self._manifest = (data, sig)
        self._verified = manifest
        return manifest

    def apply_rollbacks(self, manifest: Manifest) -> list[Build]:
        """Forget builds the server rolled back; tombstones stay. A held host forgets
        nothing (the operator keeps it as it is); it logs what it keeps."""
        forgotten: list[Build] = []
        with self.lifecycle.lock:
            if self.hold is not None:
                for build in rolled_back_builds(manifest, self.lifecycle.release):
                    state = self.lifecycle.state(build)
                    if state is not None and not isinstance(state, Bad):
                        log.warning("update.rollback_held", release=build.release,
                                    patch=build.patch, hold=self.hold.reason)
                return forgotten
            for build in rolled_back_builds(manifest, self.lifecycle.release):
                state = self.lifecycle.state(build)
                if state is None or isinstance(state, Bad):
                    continue
                self.lifecycle.forget_rolled_back(build)
                forgotten.append(build)
                log.warning("update.rolled_back_by_server", release=build.release,
                            patch=build.patch)  # the lifecycle queues the event
        return forgotten

    def decide(self, manifest: Manifest, next_boot: Build | None = None) -> Decision:
        """The strategy's decision; a tombstone recording a sha256 bans only that bundle.

        Builds whose tombstone bans the whole build are left out at once; a build
        tombstoned for other bytes is left out only when the manifest still names those
        bytes for it (then the strategy is asked again without it). ``next_boot``: ask
        as if that build booted next (what would a check do after an install of it?).
        """
        with self.lifecycle.lock:
            pointers = self.lifecycle.pointers
            tombs = {b: s for b, s in self.lifecycle.builds() if isinstance(s, Bad)}
        bad = {b for b, s in tombs.items() if s.sha256 is None}
        while True:
            view = HostView(release=pointers.release, next_boot=next_boot or pointers.next_boot,
                            bad=frozenset(bad), arch=self.config.app.arch,
                            client_id=self.client.client_id,
                            full_upgrades=self.config.install.full_upgrades)
            decision = decide(manifest, view)
            build, ref = decision.build, decision.bundle
            if build is None or ref is None or build not in tombs \
                    or not tombs[build].bans(ref.sha256):
                return decision
            bad.add(build)

    def newer_choice(self, build: Build) -> Build | None:
        """The build this host would move to by itself if ``build`` were next boot:
        next boot when it is newer, else what the last accepted manifest offers above
        ``build``; None when nothing would undo an install of ``build``."""
        with self.lifecycle.lock:
            next_boot = self.lifecycle.pointers.next_boot
        if next_boot.sort_key() > build.sort_key():
            return next_boot
        if self._verified is None:
            return None
        return self.decide(self._verified, next_boot=build).build

    # --- the operator's hold ---------------------------------------------------------

    async def place_hold(self, reason: str) -> Hold:
        """Hold the host (again: a new reason, the first ``since`` kept); durable."""
        hold = Hold(reason, self.hold.since if self.hold is not None else utc_now_text())
        await anyio.to_thread.run_sync(write_hold, self.lifecycle.layout, hold)
        placed, self.hold = self.hold is None, hold
        log.warning("hold.placed", reason=reason, since=hold.since)
        if placed:
            self.events.add("hold", None, reason)
        return hold

    async def lift_hold(self) -> Hold | None:
        """Lift the hold, if any; the hold that was lifted."""
        lifted = self.hold
        await anyio.to_thread.run_sync(remove_hold, self.lifecycle.layout)
        self.hold = None
        if lifted is not None:
            log.warning("hold.lifted", reason=lifted.reason, since=lifted.since)
            self.events.add("unhold", None, lifted.reason)
        return lifted

    # --- perform ---------------------------------------------------------------------

    async def perform(self, decision: Decision, source: Source, job: Progress) -> None:
        """Carry out a decision: fetch and install the build, then make it next boot."""
        build, ref = decision.build, decision.bundle
        if build is None or ref is None:
            return
        if self.hold is not None:  # placed after the check decided: nothing is done
            log.info("update.held", release=build.release, patch=build.patch,
                     hold=self.hold.reason)
            return
        url = source.resolve(ref.url)
        with self.lifecycle.lock:
            start = self.lifecycle.decide_start(build, url, ref.sha256, ref.size)
        log.info("update.start", release=build.release, patch=build.patch,
                 action=start.action.value, offset=start.offset)
        if start.action is Action.BAD:
            return
        installed = False
        try:
            if start.action is not Action.INSTALLED:
                bundle = await self._fetch(build, ref, url, start.action, start.offset,
                                           source, job)
                await self._install(build, decision.kind, bundle, job)
                installed = True
        except BundleHashMismatch:
            # Not the signed bytes: a transport fault. Discard them (the lifecycle alone
            # deletes downloads) so the retry starts from byte 0.
            await anyio.to_thread.run_sync(self.lifecycle.record_download_started, build,
                                           url, ref.sha256, ref.size)
            raise
        except BadInputError as exc:
            self._reject(build, exc, ref.sha256)
            raise
        # Also finishes an install whose promotion a crash interrupted (INSTALLED).
        self._promote(build)
        if installed:
            self.events.add("install", build)
            await post_install(self.config, self.lifecycle, build)

    async def _fetch(self, build: Build, ref: BundleRef, url: str, action: Action,
                     offset: int, source: Source, job: Progress) -> Path:
        """The verified bundle on disk: downloaded, resumed, re-hashed or already there."""
        lc = self.lifecycle
        dest = lc.download_path(build)
        if action in (Action.FRESH, Action.RESUME):
            if action is Action.FRESH:
                # The lifecycle drops any older download of the build (perhaps large: off
                # the event loop) before it records the new one.
                await anyio.to_thread.run_sync(lc.record_download_started, build, url,
                                               ref.sha256, ref.size)
            job.show("downloading", build, offset, ref.size)
            await source.download(url, dest, size=ref.size, sha256=ref.sha256,
                                  offset=offset,
                                  progress=self.metrics.counting(job.progress, offset))
        elif action is Action.VERIFY:
            # The whole file is on disk: the download template hashes it without asking
            # the origin, and fetches it afresh at once if a power cut left it corrupt.
            job.show("downloading", build, ref.size, ref.size)
            await source.download(url, dest, size=ref.size, sha256=ref.sha256,
                                  offset=ref.size, progress=job.progress)
        if action is not Action.COMPLETE:
            with lc.lock:
                lc.record_download_complete(build)
            self.events.add("download", build)
        return dest

    async def install_local(self, path: Path, build: Build, kind: Literal["patch", "full"],
                            job: Progress, hold: bool = False) -> None:
        """Offline install of a bundle file the operator handed us (``Install``).

        A build older than the one this host would move to by itself is refused unless
        ``hold`` (or a hold already placed) keeps the next check from undoing it. A new
        hold is placed before the install, so no crash leaves the build unheld, and is
        lifted again if the install fails; a hold already placed stays as it is.
        """
        newer = self.newer_choice(build)
        if newer is not None and not hold and self.hold is None:
            log.warning("install.downgrade_refused", build=str(build), newer=str(newer))
            raise DowngradeRefused(build, newer)
        placed = hold and self.hold is None
        if placed:
            await self.place_hold(f"installed {build} with install --hold")
        try:
            await self._install(build, kind, path, job)
        except BaseException as exc:
            if placed:
                with anyio.CancelScope(shield=True):
                    await self.lift_hold()
            if isinstance(exc, BadInputError):
                with self.lifecycle.lock:
                    self.lifecycle.record_install_aborted(build)
            raise
        self._promote(build)
        self.events.add("install", build)
        await post_install(self.config, self.lifecycle, build)

    async def _install(self, build: Build, kind: str, bundle: Path, job: Progress) -> None:
        """Materialise the tree in a worker thread; report a bad bundle as an event."""
        job.show("installing", build)
        req = InstallRequest(build=build, bundle=bundle, kind=kind,  # type: ignore[arg-type]
                             app=self.config.app.name, arch=self.config.app.arch,
                             trust=self.trust, clone=self.config.install.clone,  # type: ignore[arg-type]
                             min_free=self.config.install.min_free)
        try:
            # Each lifecycle call inside takes the lifecycle's own lock, briefly; the
            # long part (cloning, writing) holds none, so the socket stays responsive.
            # check_cancelled lets SIGTERM stop the install between two ops.
            await anyio.to_thread.run_sync(materialise, self.lifecycle, req,
                                           anyio.from_thread.check_cancelled)
        except BadInputError as exc:
            self.events.add("install_failure", build, str(exc))
            raise

    def _promote(self, build: Build) -> None:
        with self.lifecycle.lock:
            self.lifecycle.promote_to_next_boot(build)

    def _reject(self, build: Build, exc: BadInputError, sha256: str) -> None:
        """A downloaded bundle whose bytes are the signed ones is bad: tombstone the build
        for that sha256 (a tombstone keeps its first reason)."""
        with self.lifecycle.lock:
            if not isinstance(self.lifecycle.state(build), Bad):
                self.lifecycle.mark_bad(build, BadReason(exc.bad_reason), str(exc), sha256)
