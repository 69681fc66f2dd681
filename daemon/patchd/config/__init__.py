"""The config file (docs/config.md): parsed with tomllib, validated completely, defaults filled in.

Every problem names the file, the key and what was expected, and all problems are
reported at once so an operator fixes a config in one round. The result is a frozen
value: a reload builds a new one and swaps it in only when it is valid.
"""

from __future__ import annotations

import platform
import re
import ssl
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from patchd.config.files import ca_file, read_headers_file, readable_file
from patchd.config.launch import SECTIONS as LAUNCH_SECTIONS
from patchd.config.launch import ActivateSection, HealthSection, HooksSection, launch_sections
from patchd.config.metrics import KEYS as METRICS_KEYS
from patchd.config.metrics import MetricsSection, read_metrics
from patchd.core.errors import ConfigErrors, ConfigFileError, RootRejected
from patchd.core.model import is_valid_name

if TYPE_CHECKING:  # trust is imported where used: `patchd launch` must not load it
    from patchd.trust.root_store import Bootstrap

T = TypeVar("T")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
#: Fields with this metadata are secrets or derived bytes: never printed.
_HIDDEN = {"dump": False}



def parse_duration(text: object) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"``, ``"0"`` or a bare number."""
    if isinstance(text, bool):
        raise ValueError("expected a duration such as \"30s\", \"5m\", \"1h\" or \"1d\"")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _DURATION_RE.match(text) if isinstance(text, str) else None
        if not match:
            raise ValueError(
                f"expected a duration such as \"30s\", \"5m\", \"1h\" or \"1d\", got {text!r}"
            )
        value = float(match[1]) * _DURATION_UNITS[match[2]]
    if value < 0:
        raise ValueError(f"a duration cannot be negative, got {text!r}")
    return value


def parse_size(text: object) -> int:
    """Bytes from ``"200MB"`` (SI), ``"1GiB"`` (binary), ``"512B"``, ``"0"`` or a bare int."""
    if isinstance(text, bool):
        raise ValueError("expected a size such as \"200MB\"")
    if isinstance(text, int):
        value = float(text)
    else:
        match = _SIZE_RE.match(text) if isinstance(text, str) else None
        if not match:
            raise ValueError(
                f"expected a size such as \"512B\", \"200MB\" or \"1GB\", got {text!r}"
            )
        value = float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]
    if value < 0:
        raise ValueError(f"a size cannot be negative, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class AppSection:
    name: str
    release_dir: Path
    arch: str


@dataclass(frozen=True)
class ServerSection:
    manifest_url: str
    channel: str
    poll_interval: float
    poll_jitter: float
    timeout: float
    events_url: str
    #: Most seconds a manifest, signature or root may take, request to last byte.
    document_deadline: float = 120.0
    #: Bytes/s a bundle must average over the stall window (2 × timeout); 0 = no rule.
    min_rate: int = 1024
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    headers_file: str = ""
    proxy: str = ""
    #: Read from ``headers_file`` at load (start and every reload); secret, never dumped.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False, metadata=_HIDDEN)


@dataclass(frozen=True)
class TrustSection:
    keys: tuple[str, ...]
    threshold: int
    verify: str
    root_file: str = ""
    #: The pinned root's bytes, read at load so ``config check`` validates them.
    root_document: bytes = field(default=b"", repr=False, metadata=_HIDDEN)

    @property
    def raw_keys(self) -> tuple[bytes, ...]:
        from patchd.trust.signing import parse_public_key
        return tuple(parse_public_key(k) for k in self.keys)

    @property
    def bootstrap(self) -> Bootstrap:
        """Where this host's chain of roots starts (docs/formats.md#the-root-of-trust)."""
        from patchd.trust.root import parse_root
        from patchd.trust.root_store import Bootstrap
        if self.root_file:
            return Bootstrap.from_document(self.root_document, parse_root(self.root_document))
        return Bootstrap.from_keys(self.raw_keys, self.threshold)


@dataclass(frozen=True)
class PathsSection:
    state_dir: Path
    cache_dir: Path
    socket: Path


@dataclass(frozen=True)
class ApiSection:
    socket_group: str
    admins: tuple[str, ...]


@dataclass(frozen=True)
class BootSection:
    reporters: tuple[str, ...]
    timeout: float
    watch_pid: bool


@dataclass(frozen=True)
class InstallSection:
    clone: str
    full_upgrades: bool
    min_free: int
    max_download_rate: int


@dataclass(frozen=True)
class LogSection:
    format: str
    level: str


@dataclass(frozen=True)
class Config:
    """A complete, validated configuration; ``source`` is the file it came from."""

    app: AppSection
    server: ServerSection
    trust: TrustSection
    paths: PathsSection
    api: ApiSection
    boot: BootSection
    install: InstallSection
    log: LogSection
    health: HealthSection = field(default_factory=HealthSection)
    hooks: HooksSection = field(default_factory=HooksSection)
    activate: ActivateSection = field(default_factory=ActivateSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    source: str = "<memory>"


_SECTIONS: dict[str, set[str]] = {
    "app": {"name", "release_dir", "arch"},
    "server": {"manifest_url", "channel", "poll_interval", "poll_jitter", "timeout", "events_url",
               "document_deadline", "min_rate", "ca_file", "client_cert", "client_key",
               "headers_file", "proxy"},
    "trust": {"keys", "threshold", "verify", "root_file"},
    "paths": {"state_dir", "cache_dir", "socket"},
    "api": {"socket_group", "admins"},
    "boot": {"reporters", "timeout", "watch_pid"},
    "install": {"clone", "full_upgrades", "min_free", "max_download_rate"},
    "log": {"format", "level"},
    **LAUNCH_SECTIONS,
    "metrics": METRICS_KEYS,
}


def load_config(path: Path | str) -> Config:
    """Read and validate a config file; raises ConfigFileError/ConfigErrors."""
    path_text = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(path_text, None, "no such file") from None
    except OSError as exc:
        raise ConfigFileError(path_text, None, f"cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigFileError(path_text, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path_text, None, f"TOML syntax error: {exc}") from None
    return config_from_dict(doc, source=path_text)


class _Reader:
    """Collects problems while reading typed values out of the parsed document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.problems: list[tuple[str | None, str]] = []

    def get(self, section: str, key: str, check: Callable[[Any], T], default: Any,
            required: bool = False) -> T:
        table = self.doc.get(section, {})
        name = f"{section}.{key}"
        if not isinstance(table, dict) or key not in table:
            if required:
                self.problems.append((name, "is required but missing"))
            return default  # type: ignore[no-any-return]
        try:
            return check(table[key])
        except ValueError as exc:
            self.problems.append((name, str(exc)))
            return default  # type: ignore[no-any-return]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {_type_name(value)}")
    return tuple(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)
    return check


def _name(value: Any) -> str:
    text = _string(value)
    if not is_valid_name(text):
        raise ValueError(
            f"expected a lowercase name of letters, digits, '.', '_' or '-', got {text!r}"
        )
    return text


def _abs_path(value: Any) -> Path:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return Path(text)


def _url(schemes: tuple[str, ...], allow_path: bool, allow_empty: bool) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _string(value)
        if allow_empty and text == "":
            return text
        if allow_path and text.startswith("/"):
            return text
        parts = urlsplit(text)
        if parts.scheme not in schemes:
            wanted = ", ".join(f"{s}://" for s in schemes)
            also = " or an absolute path" if allow_path else ""
            raise ValueError(f"expected a URL starting with {wanted}{also}, got {text!r}")
        if parts.scheme in ("http", "https") and not parts.hostname:
            raise ValueError(f"URL has no host: {text!r}")
        return text
    return check


def _duration(value: Any) -> float:
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0, got {value!r}")
    return seconds


def _size(value: Any) -> int:
    return parse_size(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"expected a number from 0 to below 1, got {value!r}")
    return float(value)


def _keys(value: Any) -> tuple[str, ...]:
    keys = _strings(value)
    if not keys:
        raise ValueError("expected at least one trusted key, the list is empty")
    from patchd.trust.signing import parse_public_key
    for key in keys:
        parse_public_key(key)
    return keys


def _threshold(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected an integer of at least 1, got {value!r}")
    return value


def _type_name(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _transport(r: _Reader) -> dict[str, Any]:
    """The authenticated-transport keys of ``[server]`` (docs/config.md)."""
    out: dict[str, Any] = {
        "ca_file": r.get("server", "ca_file", ca_file, ""),
        "client_cert": r.get("server", "client_cert", readable_file, ""),
        "client_key": r.get("server", "client_key", readable_file, ""),
        "headers_file": r.get("server", "headers_file", readable_file, ""),
        "proxy": r.get("server", "proxy", _url(("http", "https", "socks5"), False, True), ""),
    }
    cert, key = out["client_cert"], out["client_key"]
    if bool(cert) != bool(key):
        r.problems.append(("server.client_cert" if key else "server.client_key",
                           "client_cert and client_key go together; set both or neither"))
    elif cert:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError) as exc:
            r.problems.append(("server.client_key",
                               f"{cert} and {key} are not a PEM certificate and its "
                               f"unencrypted private key ({exc})"))
    if out["headers_file"]:
        try:
            out["headers"] = read_headers_file(out["headers_file"])
        except (OSError, ValueError) as exc:
            r.problems.append(("server.headers_file", str(exc)))
    return out


def _slow_retrieval(r: _Reader, timeout: float) -> dict[str, Any]:
    """The slow-retrieval limits of ``[server]``: a document's total deadline (default
    four times ``timeout``, never below it) and the bundles' minimum rate."""
    deadline = r.get("server", "document_deadline", _positive_duration, None)
    if deadline is None:
        deadline = 4 * timeout
    elif deadline < timeout:
        r.problems.append(("server.document_deadline",
                           f"is {deadline:g}s, shorter than server.timeout ({timeout:g}s); "
                           "a document could not arrive even from a server that answers "
                           "in time"))
    return {"document_deadline": deadline,
            "min_rate": r.get("server", "min_rate", _size, 1024)}


def _trust(r: _Reader) -> TrustSection:
    """``[trust]``: ``keys`` (version 1 of the root of trust) or a pinned ``root_file``."""
    root_file = r.get("trust", "root_file", readable_file, "")
    keys = r.get("trust", "keys", _keys, (), required=not root_file)
    threshold = r.get("trust", "threshold", _threshold, 1)
    if root_file and keys:
        r.problems.append(("trust.root_file", "give trust.keys or trust.root_file, not both"))
    if keys and threshold > len(set(keys)):
        r.problems.append(("trust.threshold",
                           f"is {threshold} but only {len(set(keys))} distinct keys are trusted"))
    document = b""
    if root_file:
        from patchd.trust.root import parse_root
        try:
            document = Path(root_file).read_bytes()
            parse_root(document)
        except OSError as exc:
            r.problems.append(("trust.root_file", f"cannot read: {exc.strerror}"))
        except RootRejected as exc:
            r.problems.append(("trust.root_file", str(exc)))
    return TrustSection(keys=keys, threshold=threshold,
                        verify=r.get("trust", "verify", _one_of("install", "strict"), "install"),
                        root_file=root_file, root_document=document)


def config_from_dict(doc: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document; the single place defaults are decided."""
    r = _Reader(doc)
    for section, value in doc.items():
        if section not in _SECTIONS:
            expected = ", ".join(_SECTIONS)
            r.problems.append((section, f"unknown section (expected one of {expected})"))
        elif not isinstance(value, dict):
            r.problems.append((section, "expected a table"))
        else:
            for key in value:
                if key not in _SECTIONS[section]:
                    r.problems.append((f"{section}.{key}", "unknown key"))

    name = r.get("app", "name", _name, "app", required=True)
    arch = r.get("app", "arch", _string, "auto")
    app = AppSection(
        name=name,
        release_dir=r.get("app", "release_dir", _abs_path, Path("/"), required=True),
        arch=platform.machine() if arch == "auto" else arch,
    )
    timeout = r.get("server", "timeout", _positive_duration, 30.0)
    server = ServerSection(
        manifest_url=r.get("server", "manifest_url", _url(("http", "https", "file"), True, False),
                           "", required=True),
        channel=r.get("server", "channel", _name, "stable"),
        poll_interval=r.get("server", "poll_interval", _positive_duration, 3600.0),
        poll_jitter=r.get("server", "poll_jitter", _fraction, 0.1),
        timeout=timeout,
        events_url=r.get("server", "events_url", _url(("http", "https"), False, True), ""),
        **_slow_retrieval(r, timeout),
        **_transport(r),
    )
    trust = _trust(r)
    paths = PathsSection(
        state_dir=r.get("paths", "state_dir", _abs_path, Path(f"/var/lib/patchd/{name}")),
        cache_dir=r.get("paths", "cache_dir", _abs_path, Path(f"/var/cache/patchd/{name}")),
        socket=r.get("paths", "socket", _abs_path, Path(f"/run/patchd/{name}.sock")),
    )
    api = ApiSection(socket_group=r.get("api", "socket_group", _string, name),
                     admins=r.get("api", "admins", _strings, ()))
    boot = BootSection(reporters=r.get("boot", "reporters", _strings, (name,)),
                       timeout=r.get("boot", "timeout", _duration, 0.0),
                       watch_pid=r.get("boot", "watch_pid", _boolean, True))
    install = InstallSection(
        clone=r.get("install", "clone", _one_of("auto", "hardlink", "reflink", "copy"), "auto"),
        full_upgrades=r.get("install", "full_upgrades", _boolean, True),
        min_free=r.get("install", "min_free", _size, 200 * 1000**2),
        max_download_rate=r.get("install", "max_download_rate", _size, 0),
    )
    log = LogSection(
        format=r.get("log", "format", _one_of("auto", "journal", "json", "console"), "auto"),
        level=r.get("log", "level", _one_of("debug", "info", "warning", "error"), "info"),
    )
    health, hooks, activate = launch_sections(r)
    metrics = read_metrics(r.get)
    if r.problems:
        raise ConfigErrors(source, r.problems)
    return Config(app=app, server=server, trust=trust, paths=paths, api=api, boot=boot,
                  install=install, log=log, health=health, hooks=hooks, activate=activate,
                  metrics=metrics, source=source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _sections(config: Config) -> Iterator[tuple[str, Any]]:
    for f in fields(config):
        if f.name != "source":
            yield f.name, getattr(config, f.name)


def dump_config(config: Config) -> str:
    """The effective config as TOML (durations in seconds, sizes in bytes), for ``config check``."""
    out = [f"# effective configuration of {config.source}"]
    for section_name, section in _sections(config):
        out.append(f"\n[{section_name}]")
        for f in fields(section):
            if f.metadata.get("dump", True):
                out.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
    return "\n".join(out) + "\n"
