"""One update: check the manifest, decide, download, verify and install (SPEC §3.4).

The :class:`Updater` carries out what ``strategy.decide`` and ``Lifecycle.decide_start``
say; it never edits state files itself. Errors leave by class: a ``BadInputError`` has
already tombstoned the build when it propagates, a ``TransientError`` kept whatever
partial data there was, a ``ConfigError`` changed nothing.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from pathlib import Path

import anyio
import structlog

from patchd.build.install import InstallRequest, install
from patchd.config import Config
from patchd.core.errors import BadInputError
from patchd.core.model import Bad, BadReason, Build
from patchd.fetch.download import remove_download, verify_file
from patchd.fetch.sources import Source
from patchd.service.activity import ActivityBoard
from patchd.service.events import EventQueue
from patchd.state import Action, ClientState, Lifecycle, accepted, save_client_state
from patchd.trust.manifest import Manifest, verify_manifest
from patchd.trust.signing import TrustedKeys
from patchd.trust.strategy import Decision, HostView, decide, rolled_back_builds

log = structlog.get_logger("patchd.service.updater")


class Updater:
    """Checks and updates for one app; the supervisor owns the tasks that call it.

    ``lock`` makes multi-step lifecycle reads consistent against the installer's worker
    thread (the lifecycle's own lock, reentrant).
    """

    def __init__(self, config: Config, lifecycle: Lifecycle, client: ClientState,
                 events: EventQueue, board: ActivityBoard, lock: threading.RLock) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.client = client
        self.events = events
        self.board = board
        self.lock = lock
        self._manifest: tuple[bytes, bytes] | None = None

    @property
    def trust(self) -> TrustedKeys:
        return TrustedKeys.from_raw(list(self.config.trust.raw_keys), self.config.trust.threshold)

    # --- check -----------------------------------------------------------------------

    async def fetch_verified(self, source: Source) -> Manifest:
        """Fetch (conditionally) and verify the manifest; persist the accepted serial."""
        validators = self.client.validators if self._manifest else None
        fetched = await source.fetch_manifest(validators)
        if fetched is None and self._manifest is not None:
            data, sig = self._manifest  # 304: re-verify, it may have expired since
            new_validators = self.client.validators
        else:
            if fetched is None:
                fetched = await source.fetch_manifest(None)
            assert fetched is not None
            data, sig, new_validators = fetched.manifest, fetched.signature, fetched.validators
        manifest = verify_manifest(
            data, sig, self.trust, app=self.config.app.name, channel=self.config.server.channel,
            min_serial=self.client.manifest_serial, same_serial_sha256=self.client.manifest_sha256,
            now=datetime.now(UTC))
        digest = hashlib.sha256(data).hexdigest()
        if (manifest.serial, digest, new_validators) != (
                self.client.manifest_serial, self.client.manifest_sha256, self.client.validators):
            self.client = accepted(self.client, manifest.serial, digest, new_validators)
            save_client_state(self.lifecycle.layout, self.client)
        self._manifest = (data, sig)
        return manifest

    def apply_rollbacks(self, manifest: Manifest) -> list[Build]:
        """Forget builds the server rolled back (SPEC §3.2); tombstones stay."""
        forgotten = []
        with self.lock:
            for build in rolled_back_builds(manifest, self.lifecycle.release):
                state = self.lifecycle.state(build)
                if state is None or isinstance(state, Bad):
                    continue
                self.lifecycle.forget_rolled_back(build)
                forgotten.append(build)
                log.warning("update.rolled_back_by_server", release=build.release,
                            patch=build.patch)
                self.events.add("rollback", build, "rolled back by the server")
        return forgotten

    def decide(self, manifest: Manifest) -> Decision:
        with self.lock:
            pointers = self.lifecycle.pointers
            view = HostView(release=pointers.release, next_boot=pointers.next_boot,
                            bad=frozenset(self.lifecycle.bad_builds()),
                            arch=self.config.app.arch, client_id=self.client.client_id,
                            full_upgrades=self.config.install.full_upgrades)
        return decide(manifest, view)

    # --- perform ---------------------------------------------------------------------

    async def perform(self, decision: Decision, source: Source) -> None:
        """Download (resuming when possible), verify and install the decided build."""
        build, ref = decision.build, decision.bundle
        if build is None or ref is None:
            return
        url = source.resolve(ref.url)
        lc = self.lifecycle
        with self.lock:
            start = lc.decide_start(build, url, ref.sha256, ref.size)
            dest = lc.download_path(build)
        log.info("update.start", release=build.release, patch=build.patch,
                 action=start.action.value, offset=start.offset)
        if start.action is Action.BAD:
            return
        if start.action is Action.INSTALLED:
            with self.lock:
                if lc.pointers.next_boot != build:
                    # Installed but never promoted: the daemon died between the two
                    # steps. The strategy still wants it, so finish the job.
                    lc.promote_to_next_boot(build)
            return
        try:
            if start.action in (Action.FRESH, Action.RESUME):
                offset = start.offset
                if start.action is Action.FRESH:
                    await anyio.to_thread.run_sync(remove_download, dest)
                    with self.lock:
                        lc.record_download_started(build, url, ref.sha256, ref.size)
                self.board.set("downloading", build, offset, ref.size)
                await source.download(url, dest, size=ref.size, sha256=ref.sha256,
                                      offset=offset, progress=self.board.progress)
            elif start.action is Action.VERIFY:
                self.board.set("downloading", build, ref.size, ref.size)
                await verify_file(dest, ref.size, ref.sha256)
            if start.action is not Action.COMPLETE:
                with self.lock:
                    lc.record_download_complete(build)
                self.events.add("download", build)
            await self._install(build, decision.kind, dest)
        except BadInputError as exc:
            self._mark_bad(build, exc)
            raise

    async def install_local(self, path: Path, build: Build, kind: str) -> None:
        """Offline install of a bundle file the operator handed us (``Install``)."""
        await self._install(build, kind, path, local=True)

    async def _install(self, build: Build, kind: str, bundle: Path, local: bool = False) -> None:
        self.board.set("installing", build)
        req = InstallRequest(build=build, bundle=bundle, kind=kind,  # type: ignore[arg-type]
                             app=self.config.app.name, arch=self.config.app.arch,
                             trust=self.trust, clone=self.config.install.clone,  # type: ignore[arg-type]
                             min_free=self.config.install.min_free,
                             mark_bad_on_bad_input=not local)

        try:
            # Each lifecycle call inside takes the lifecycle's own lock, briefly; the
            # long part (cloning, writing) holds none, so the socket stays responsive.
            # check_cancelled lets SIGTERM stop the install between two ops.
            await anyio.to_thread.run_sync(install, self.lifecycle, req,
                                           anyio.from_thread.check_cancelled)
        except BadInputError as exc:
            self.events.add("install_failure", build, str(exc))
            raise
        self.events.add("install", build)

    def _mark_bad(self, build: Build, exc: BadInputError) -> None:
        with self.lock:
            if not isinstance(self.lifecycle.state(build), Bad):
                self.lifecycle.mark_bad(build, BadReason(exc.bad_reason), str(exc))
