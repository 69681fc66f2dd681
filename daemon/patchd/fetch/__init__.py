"""fetch: bring manifests and bundles from a repository into the cache, never trusting it.

A repository (docs/formats.md) is static files on an HTTP(S) server, a CDN or in a local
directory. This layer fetches the manifest and its signature (conditionally, capped at
:data:`patchd.trust.manifest.MAX_DOCUMENT_BYTES`) and downloads bundles so that a
download survives anything a network does (docs/lifecycle.md): resets, truncation, lying
headers, stalls, cancellation, a SIGKILL. It checks bytes against the size and SHA-256
the caller got from the signed manifest; whether a manifest is trusted is
:mod:`patchd.trust`'s question, what a download means for a build is the caller's.

The rules, each kept in one place:

- Whatever is on disk is always a prefix of *one* response stream. A restart from zero
  truncates (and fsyncs) the file before the new origin's validators are recorded in
  the meta beside it (:class:`patchd.state.layout.DownloadFiles`), so a resume after a
  crash never sends ``If-Range`` for bytes that came from another version of the file.
- SHA-256 continues over the bytes already on disk, then over new bytes. A bundle's
  body never reaches the event loop: the bulk client (httpx's synchronous twin of the
  control client, same settings) sends the request in a worker thread, and the body is
  read off the socket into four reused 1 MiB buffers, written and hashed by two more
  threads (:mod:`~patchd.fetch.wire`, :mod:`~patchd.fetch.pump`). Memory stays
  bounded, at most 4 MiB is fetched again after a SIGKILL, and a cancel is honoured
  within a second.
- Never more than the manifest's ``size`` bytes: a response that announces or sends
  more is aborted at once (:class:`DownloadOversize`, a :class:`BundleHashMismatch`,
  because bytes beyond the signed size cannot hash to the signed value).
- One stall rule (fewer than ``stall_min_bytes`` in ``stall_window`` seconds) covers the
  request, the response head and the body, for bundles and documents alike. A server
  trickling just above it is still cut off: a document must arrive whole within
  ``document_deadline``, a bundle must average ``min_rate`` over a sliding
  ``stall_window`` (both :class:`DownloadStalled`, transient; a bundle keeps its bytes).
- Bodies are bytes on the wire (``Accept-Encoding: identity``, never decoded): the hash
  against the signed manifest decides.
- A file that fails its hash or size is deleted with its meta before the error is
  raised: it must never be resumed from. It is a transport fault, retried later.

Failure classes (the daemon's policy follows from them, see :mod:`patchd.core.errors`):

- transient: transport errors and timeouts (:class:`NetworkError`), a body ending short
  (:class:`DownloadTruncated`), a stall (:class:`DownloadStalled`), 5xx/408/429
  (:class:`ServerError` with ``retry_after``), 404/410 on a bundle
  (:class:`BundleNotFound`: the signed manifest may be newer than the mirror or CDN
  edge serving the bundle, so this is retried rather than blamed on the build), ENOSPC
  (:class:`DiskFull`, partial data kept).
- transient too: :class:`BundleHashMismatch`, :class:`DownloadOversize` (not the
  signed bytes: the file is discarded, never the build).
- configuration: :class:`RepositoryError` for TLS failures, unsupported URL schemes,
  other 4xx, and redirect loops (more than ``max_redirects`` hops is a deterministic
  server misconfiguration; retrying within seconds cannot fix it, the next poll will).

Modules, each with one job:

- :mod:`~patchd.fetch.sources`: the repository API (:class:`Source`, :func:`open_source`);
- :mod:`~patchd.fetch.transfer`: the download template (``Transport.download``): the
  partial-file protocol and the limits, once for every transport;
- :mod:`~patchd.fetch.http`, :mod:`~patchd.fetch.local`: the two transports, and what
  else their kind of repository needs (documents over HTTP, paths and capped reads);
- :mod:`~patchd.fetch.wire`: a bundle's response: the head through the bulk client,
  the body read off the connection's socket; :mod:`~patchd.fetch.client`: the clients;
- :mod:`~patchd.fetch.pump`: receive → write → hash threads over reused buffers, with
  the stall and rate watchdogs; :mod:`~patchd.fetch.limits`: the knobs, rate limiter,
  stall deadline;
- :mod:`~patchd.fetch.partial`: the partial file, its meta, :func:`verify_file`.

Imports point down only: this layer uses :mod:`patchd.core`, :mod:`patchd.state.layout`
and :mod:`patchd.trust.manifest`; it never imports :mod:`patchd.service`,
:mod:`patchd.build`, :mod:`patchd.cli` or :mod:`patchd.publisher`.
"""

from patchd.fetch.limits import DownloadPolicy
from patchd.fetch.partial import remove_download, verify_file
from patchd.fetch.pump import Progress
from patchd.fetch.sources import HttpSource, LocalSource, ManifestFetch, Source, open_source

__all__ = [
    "DownloadPolicy",
    "HttpSource",
    "LocalSource",
    "ManifestFetch",
    "Progress",
    "Source",
    "open_source",
    "remove_download",
    "verify_file",
]
