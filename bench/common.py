"""Shared bench helpers: /proc figures of a process, the RESULT line convention, a table.

Every bench prints, besides its own human output, one machine-readable line per figure::

    RESULT name=<figure> value=<number> unit=<u> baseline=<number|-> ratio=<number|->
           target=<text> pass=<yes|no>

(one line; values with spaces are shell-quoted, so ``shlex.split`` reads them back).
``bench/run`` collects these lines from every bench into one table.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def make_tree(root: Path, total: int, count: int, seed: int = 1,
              version: str | None = None) -> list[Path]:
    """``count`` files of about ``total`` bytes in all, 100 per directory, sizes drawn
    from an exponential distribution, each half random and half repeated (compresses
    about 2:1, like real app trees); plus ``VERSION`` when given."""
    rng = random.Random(seed)
    files = []
    mean = total // count
    root.mkdir(parents=True, exist_ok=True)
    if version is not None:
        (root / "VERSION").write_text(version + "\n")
    for i in range(count):
        d = root / f"d{i // 100:03d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = max(1, int(rng.expovariate(1 / mean))) if i % 10 else mean
        half = rng.randbytes(size // 2 + 1)
        path = d / f"f{i:05d}.bin"
        path.write_bytes((half + half)[:size])
        files.append(path)
    return files


FIELDS = ("name", "value", "unit", "baseline", "ratio", "target", "pass")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, from /proc/PID/status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0])
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def run_peak_rss(cmd: Sequence[str], **kw: object) -> tuple[int, int]:
    """Run ``cmd`` to completion; (exit status, peak RSS in KiB from wait4's rusage)."""
    proc = subprocess.Popen(list(cmd), **kw)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss)


@dataclass
class Result:
    """One figure of one bench."""

    name: str
    value: float
    unit: str
    target: str
    ok: bool
    baseline: float | None = None
    ratio: float | None = None
    bench: str = ""

    def line(self) -> str:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.6g}"

        parts = {"name": self.name, "value": num(self.value), "unit": self.unit,
                 "baseline": num(self.baseline), "ratio": num(self.ratio),
                 "target": self.target, "pass": "yes" if self.ok else "no"}
        return "RESULT " + " ".join(f"{k}={shlex.quote(v)}" for k, v in parts.items())


def emit(name: str, value: float, unit: str, target: str, ok: bool,
         baseline: float | None = None, ratio: float | None = None) -> Result:
    """Print one RESULT line (flushed) and return it."""
    result = Result(name, value, unit, target, ok, baseline, ratio)
    print(result.line(), flush=True)
    return result


def parse_result(line: str, bench: str = "") -> Result | None:
    """A Result from a ``RESULT ...`` line, or None when the line is not one."""
    if not line.startswith("RESULT "):
        return None
    try:
        pairs = dict(p.split("=", 1) for p in shlex.split(line[len("RESULT "):]))
    except ValueError:
        return None
    if not set(FIELDS) <= pairs.keys():
        return None

    def num(text: str) -> float | None:
        try:
            return None if text == "-" else float(text)
        except ValueError:
            return None

    value = num(pairs["value"])
    return Result(pairs["name"], value if value is not None else float("nan"), pairs["unit"],
                  pairs["target"], pairs["pass"] == "yes", num(pairs["baseline"]),
                  num(pairs["ratio"]), bench)


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)
