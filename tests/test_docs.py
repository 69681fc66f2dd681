"""The user documentation cannot drift from the code: commands parse, snippets run, links resolve.

Every ``patchd …`` command line shown in docs/*.md and README.md is parsed with the real
argparse parser; the Python boot snippet of docs/host-integration.md boots a build
through a real daemon (and a crashing one is caught); the nginx snippet passes
``nginx -t``; relative links and their anchors point at something that exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.cli.main import build_parser
from patchd.service.interface import INTERFACE_TEXT
from support.daemon import DaemonProcess, Publisher, state_of, write_tree

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: Documents that are linked before they are written; a link to them may dangle
#: only while the file does not exist.
PLANNED: set[Path] = set()


def doc_files() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


# --- extracting code from markdown -------------------------------------------------------

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, code) of every fenced block, and ("indented", code) of indented ones."""
    lines = text.splitlines()
    i = 0
    previous_blank = True
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            indent, lang = fence.group(1), fence.group(2) or "text"
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            yield lang, "\n".join(body)
            i += 1
            previous_blank = False
            continue
        if previous_blank and lines[i].startswith("    ") and lines[i].strip() \
                and not lines[i].lstrip().startswith(("-", "*")):
            body = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            yield "indented", "\n".join(body)
            previous_blank = True
            continue
        previous_blank = not lines[i].strip()
        i += 1


def python_blocks(path: Path) -> list[str]:
    return [code for lang, code in code_blocks(path.read_text()) if lang == "python"]


# --- finding patchd invocations ------------------------------------------------------------

#: Shell variables in examples, replaced before parsing (pids must be numbers).
_VARIABLES = {"$$": "4242", "$MAINPID": "4242"}
_SEPARATORS = {"&&", "||", ";", "|", "(", ")", "$(", "`", "&", "then", "do", "if", "!"}


def _substitute(line: str) -> str:
    for name, value in _VARIABLES.items():
        line = line.replace(name, value)
    line = re.sub(r"\$\{?(\w*PID\w*)\}?", "4242", line)
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", r"VAR_\1", line)


def _logical_lines(code: str) -> Iterator[str]:
    pending = ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield pending + raw
        pending = ""
    if pending:
        yield pending


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line.replace("$(", " $( "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    lexer.wordchars += "$`"
    return list(lexer)


def _segments(tokens: list[str]) -> Iterator[list[str]]:
    current: list[str] = []
    for token in tokens:
        if token in _SEPARATORS or (token and set(token) <= set(";&|()")):
            if current:
                yield current
            current = []
        else:
            current.append(token)
    if current:
        yield current


def _is_patchd(word: str) -> bool:
    return word == "patchd" or word.endswith("/patchd")


def patchd_invocations(line: str) -> Iterator[list[str]]:
    """The argument lists of every ``patchd`` command on one shell line."""
    if re.match(r"^\s*[-+!@]*Exec\w*=", line):  # a unit file line: systemd unescapes $$
        line = re.sub(r"^\s*Exec\w*=[-+!@:]*", "", line).replace("$$", "$")
    try:
        tokens = _tokens(_substitute(line))
    except ValueError:  # unbalanced quotes: prose, not a command line
        return
    for segment in _segments(tokens):
        while segment and (segment[0] in ("sudo", "exec", "env")
                           or re.match(r"^\w+=", segment[0])):
            word = segment.pop(0)
            if word == "sudo":
                while segment and segment[0].startswith("-"):
                    option = segment.pop(0)
                    if option in ("-u", "-g") and segment:
                        segment.pop(0)
            if re.match(r"^\w+=.+", word) and _is_patchd(word.split("=", 1)[1]):
                segment.insert(0, word.split("=", 1)[1])
                break
        if len(segment) >= 3 and segment[0].endswith("sh") and segment[1] == "-c":
            yield from patchd_invocations(segment[2])
        elif len(segment) >= 3 and segment[1:3] == ["-m", "patchd"]:
            yield segment[3:]
        elif segment and _is_patchd(segment[0]):
            yield segment[1:]


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in doc_files():
        for lang, code in code_blocks(path.read_text()):
            if lang not in ("sh", "bash", "shell", "console", "indented", "ini"):
                continue
            for line in _logical_lines(code):
                for args in patchd_invocations(line):
                    found.append((f"{path.name}: {line.strip()}", args))
    return found


def test_extractor_finds_commands_inside_substitutions_and_units() -> None:
    """The command finder sees patchd in $(…), after &&, in sh -c and in Exec lines."""
    assert list(patchd_invocations('tree=$(patchd boot start kiosk --pid $$) && exec "$t"')) \
        == [["boot", "start", "kiosk", "--pid", "4242"]]
    assert list(patchd_invocations(
        "ExecStart=/bin/sh -c 'tree=$$(/usr/bin/patchd boot start kiosk --pid $$$$) && "
        "exec \"$$tree/bin/kiosk\"'")) == [["boot", "start", "kiosk", "--pid", "4242"]]
    assert list(patchd_invocations("sudo patchd status kiosk --json  # comment")) \
        == [["status", "kiosk", "--json"]]
    assert list(patchd_invocations("sudo -u patchd patchd run --config /x.toml")) \
        == [["run", "--config", "/x.toml"]]
    assert list(patchd_invocations("journalctl -u patchd@kiosk -f")) == []


def test_every_documented_command_parses() -> None:
    """Each patchd command line in the docs is accepted by the real argparse parser."""
    commands = documented_commands()
    assert len(commands) >= 30, f"too few commands found, is the extractor broken? {commands}"
    parser = build_parser()
    failures = []
    for where, args in commands:
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            if exc.code != 0:
                failures.append(where)
    assert not failures, "these documented commands do not parse:\n" + "\n".join(failures)


def test_a_drifted_command_would_be_caught() -> None:
    """The parser check has teeth: an option the CLI does not have is rejected."""
    [args] = list(patchd_invocations("patchd publish --repo r --app a --channel c "
                                     "--key k --rollback 1.0:2"))
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(args)
    assert exc.value.code == 2


def test_every_cli_command_is_documented() -> None:
    """Every subcommand of the CLI appears in at least one documented command line."""
    used = {" ".join(args[:2]) if args[:1] in (["boot"], ["config"], ["root"]) else args[0]
            for _, args in documented_commands() if args}
    expected = {"run", "config check", "status", "watch", "check", "install", "rollback",
                "hold", "unhold", "unmark", "boot-target", "boot start", "boot success",
                "boot failure", "launch", "keygen", "pack", "publish", "root create",
                "root sign", "demo"}
    assert expected <= used, f"undocumented: {sorted(expected - used)}"


def test_socket_md_states_the_served_interface() -> None:
    """The varlink block of docs/socket.md is the interface the daemon serves, verbatim."""
    text = (DOCS / "socket.md").read_text()
    blocks = re.findall(r"```varlink\n(.*?)```", text, flags=re.S)
    assert blocks == [INTERFACE_TEXT]


# --- the Python snippet against a real daemon --------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="patchd-docs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _python_app(snippet: str, marker: Path) -> str:
    return (f"#!{sys.executable}\n{snippet}\n"
            f"open({str(marker)!r}, 'w').write(os.environ['PATCHD_BUILD'])\n")


def test_python_snippet_boots_a_build_and_a_crash_is_caught(work: Path) -> None:
    """The documented stdlib launcher + app snippet boot a patch; a crashing patch falls back."""
    launcher_code, app_code = python_blocks(DOCS / "host-integration.md")[:2]
    lib = work / "lib"
    lib.mkdir()
    (lib / "patchd_boot.py").write_text(launcher_code)
    marker = work / "booted"
    release = write_tree(work / "opt" / "kiosk", {"bin/kiosk": "#!/bin/sh\nexit 0\n"}, "1.0")
    (release / "bin" / "kiosk").chmod(0o755)

    publisher = Publisher(work, work / "repo")
    good = write_tree(work / "good", {"bin/kiosk": _python_app(app_code, marker)}, "1.0")
    (good / "bin" / "kiosk").chmod(0o755)
    publisher.publish(publisher.bundle("1.0", 1, release, good))
    daemon = DaemonProcess(work, manifest_url=str(work / "repo" / "manifest.json"),
                           keys=[publisher.public], release_dir=release)
    try:
        daemon.start()
        assert daemon.check_and_wait()["strategy"] == "patch"
        env = {**os.environ, "PATCHD_SOCKET": str(daemon.socket), "PYTHONPATH": str(lib)}
        launch = [sys.executable, str(lib / "patchd_boot.py")]
        proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert '"patch": 1' in marker.read_text()
        status = daemon.status()
        assert status["last_booted"] == {"release": "1.0", "patch": 1}
        assert status["currently_booting"] is None

        crash = write_tree(work / "crash", {"bin/kiosk": "#!/bin/sh\nexit 3\n"}, "1.0")
        (crash / "bin" / "kiosk").chmod(0o755)
        publisher.publish(publisher.bundle("1.0", 2, release, crash))
        daemon.check_and_wait()
        assert daemon.status()["next_boot"] == {"release": "1.0", "patch": 2}
        proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 3
        status = daemon.wait_status(lambda s: state_of(s, "1.0", 2) == "bad", "boot_crash")
        assert [b["reason"] for b in status["builds"] if b["state"] == "bad"] == ["boot_crash"]
        assert status["next_boot"] == {"release": "1.0", "patch": 1}
    finally:
        daemon.stop()
        daemon.close()


# --- the nginx snippet -----------------------------------------------------------------


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists() and not shutil.which("nginx"),
                    reason="nginx is not installed")
def test_nginx_snippet_is_valid(work: Path) -> None:
    """The server block in docs/publishing.md passes nginx -t."""
    blocks = [c for lang, c in code_blocks((DOCS / "publishing.md").read_text())
              if lang == "nginx"]
    assert blocks, "no nginx block in publishing.md"
    conf = work / "nginx.conf"
    conf.write_text(f"pid {work}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
                    f"http {{\naccess_log off;\nclient_body_temp_path {work};\n"
                    f"{blocks[0]}\n}}\n")
    nginx = "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "nginx"
    proc = subprocess.run([nginx, "-t", "-q", "-p", str(work), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# --- links -------------------------------------------------------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_links_between_docs_resolve() -> None:
    """Every relative link in docs/*.md and README.md names an existing file and heading."""
    problems = []
    count = 0
    for path in doc_files():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue
            count += 1
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                if dest not in PLANNED:
                    problems.append(f"{path.name}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.name}: {target} (no heading #{anchor})")
    assert count >= 10, "too few links found; is the link pattern broken?"
    assert not problems, "\n".join(problems)
