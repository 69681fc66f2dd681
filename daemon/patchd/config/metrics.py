"""``[metrics]``: where the daemon writes its Prometheus metrics (docs/config.md).

Off by default. The file is for node_exporter's textfile collector, which reads only
``*.prom`` files of one directory, so the path must be absolute and end in ``.prom``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KEYS", "MetricsSection", "read_metrics"]

#: The keys ``[metrics]`` may hold.
KEYS = {"textfile"}


@dataclass(frozen=True)
class MetricsSection:
    #: The textfile-collector file the daemon keeps current; "" writes none.
    textfile: str = ""


def _textfile(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if value == "":
        return value
    if not value.startswith("/"):
        raise ValueError(f"expected an absolute path, got {value!r}")
    if not value.endswith(".prom") or value.endswith("/.prom"):
        raise ValueError(f"expected a file name ending in .prom (node_exporter's textfile "
                         f"collector reads only those), got {value!r}")
    return value


def read_metrics(get: Callable[[str, str, Callable[[Any], str], Any], str]) -> MetricsSection:
    """``[metrics]`` through the config reader's ``get(section, key, check, default)``."""
    return MetricsSection(textfile=get("metrics", "textfile", _textfile, ""))
