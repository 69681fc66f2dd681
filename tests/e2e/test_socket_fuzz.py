"""Socket fuzz: hostile bytes and calls on the real daemon's socket change nothing.

Hypothesis generates raw NUL-free byte strings (terminated or not) and JSON messages
(random and real method names of ``io.patchd.Updater`` and ``org.varlink.service``,
random parameter shapes, huge numbers, NaN/Infinity, deep nesting, wrong envelope
types), each sent over a fresh connection to a running ``patchd run``, split across
several writes. After every example:

- the daemon answered with a well-formed varlink message or closed the connection,
  never hung (every socket operation has a bound);
- a GetStatus on a new connection succeeds (the daemon keeps serving) and the process
  is alive;
- the state and cache directories are byte-identical to before (snapshot of every
  file, mode and link): no rejected request changes state. Calls that a reporter could
  legitimately make succeed (a valid ``BootStart``) are left out of the generator, and
  every other mutating call is rejected by construction (no boot in progress, nothing
  to roll back, no repository, no valid bundle), so "unchanged" holds for all examples.

``PATCHD_FULL=1`` runs 2,000 examples per strategy instead of 150.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if TESTS_DIR not in sys.path:  # when run without tests/e2e/conftest.py
    sys.path.insert(0, TESTS_DIR)

from patchd.varlink import VarlinkError  # noqa: E402
from support.daemon import DaemonProcess, write_tree  # noqa: E402
from support.trees import snapshot  # noqa: E402

RELEASE = "1.4.0"
FULL = os.environ.get("PATCHD_FULL") == "1"
EXAMPLES = 2000 if FULL else 150
IFACE = "io.patchd.Updater"
METHODS = ["GetStatus", "GetBootTarget", "BootStart", "BootSuccess", "BootFailure",
           "CheckNow", "Install", "Rollback", "WatchActivity"]
SERVICE = ["org.varlink.service.GetInfo", "org.varlink.service.GetInterfaceDescription"]
REPLY_TIMEOUT = 15.0
STATS: Counter[str] = Counter()

# Examples run for a bounded time each (every socket call has a timeout); hypothesis'
# own per-example deadline is off because a shared CI core makes its timing flaky.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not FULL,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon whose repository does not exist (CheckNow is always refused)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    release = write_tree(tmp / "opt" / "kiosk", {"bin/kiosk": "#!/bin/sh\n"}, version=RELEASE)
    d = DaemonProcess(tmp / "d", manifest_url=str(tmp / "no-repo" / "manifest.json"),
                      keys=["ed25519:" + "A" * 43 + "="], release_dir=release)
    d.expected_errors.add("check.failed")  # CheckNow is always refused here
    d.start()
    try:
        yield d
    finally:
        d.close()


def state_snapshot(d: DaemonProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    return snapshot(d.state_dir), snapshot(d.cache_dir) if d.cache_dir.exists() else {}


def exchange(d: DaemonProcess, chunks: list[bytes]) -> list[bytes] | None:
    """Send ``chunks`` as separate writes, half-close, read to EOF; the replies, or
    None when the daemon closed the connection without a word."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(REPLY_TIMEOUT)
        s.connect(str(d.socket))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            try:
                data = s.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no reply and no close within {REPLY_TIMEOUT}s "
                                     f"for {b''.join(chunks)[:200]!r}") from None
            if not data:
                break
            buf += data
            # A stream (WatchActivity with more) stays open for a half-closed client,
            # which may still be reading it: its first reply is enough to judge it.
            if b"\0" in buf and (len(buf) > 1 << 16 or _continues(buf.split(b"\0")[0])):
                break
    if not buf:
        return None
    return [part for part in buf.split(b"\0") if part] if buf.endswith(b"\0") else [
        *buf.split(b"\0")]


def _continues(raw: bytes) -> bool:
    """Whether a reply says more replies follow (``"continues": true``)."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("continues") is True


def check_reply(replies: list[bytes] | None) -> str:
    """Every reply is a varlink object; the classification for the statistics."""
    if replies is None:
        return "closed"
    kinds = []
    for raw in replies:
        msg = json.loads(raw)
        assert isinstance(msg, dict), raw[:200]
        if "error" in msg:
            assert isinstance(msg["error"], str) and "." in msg["error"], msg
            STATS["error " + msg["error"]] += 1
            assert isinstance(msg.get("parameters", {}), dict), msg
            kinds.append("rejected")
        else:
            assert isinstance(msg.get("parameters"), dict), msg
            kinds.append("accepted")
    return "rejected" if "rejected" in kinds else "accepted"


def after_example(d: DaemonProcess, before: tuple[dict[str, Any], dict[str, Any]],
                  sent: bytes) -> None:
    status = d.status()  # a new connection, a normal call
    assert status["app"] == "kiosk"
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    after = state_snapshot(d)
    assert after == before, f"state changed after {sent[:300]!r}"
    assert status["currently_booting"] is None
    assert status["next_boot"] == {"release": RELEASE, "patch": 0}


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [data]


# --- strategies ---------------------------------------------------------------------------

huge_ints = st.one_of(st.integers(), st.sampled_from(
    [0, -1, 1, 2**31 - 1, 2**31, 2**63, -(2**63), 2**64, 10**40, -(10**40)]))
scalars = st.one_of(st.none(), st.booleans(), huge_ints,
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=40), st.sampled_from(["", RELEASE, "\u202e", "../x", "0"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
builds = st.one_of(
    json_values,
    st.fixed_dictionaries({"release": json_values, "patch": json_values}),
    st.fixed_dictionaries({"release": st.sampled_from([RELEASE, "1.4", "9.9.9", "1.4.0/.."]),
                           "patch": huge_ints}),
)
paths = st.one_of(st.text(max_size=60), st.sampled_from([
    "/", "/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/mem", "/etc/passwd",
    "/nonexistent.patchd", "relative.patchd", "/tmp/../etc/shadow", "/" + "a" * 5000]))
method_names = st.one_of(
    st.sampled_from([f"{IFACE}.{m}" for m in METHODS] + SERVICE),
    st.sampled_from(METHODS),                          # unqualified
    st.builds(lambda m, s: f"{IFACE}.{m}{s}", st.sampled_from(METHODS), st.text(max_size=5)),
    st.builds(lambda s: f"{IFACE}.{s}", st.text(max_size=20)),
    st.text(max_size=40),
    json_values,                                       # not a string at all
)


@st.composite
def parameters_for(draw: st.DrawFn, method: object) -> object:
    """Random shapes, biased towards each real method's own parameter names."""
    short = method.rpartition(".")[2] if isinstance(method, str) else ""
    own: dict[str, st.SearchStrategy[Any]] = {
        "BootStart": st.fixed_dictionaries({}, optional={"build": builds, "pid": huge_ints}),
        "BootSuccess": st.fixed_dictionaries({}, optional={"build": builds}),
        "BootFailure": st.fixed_dictionaries({}, optional={"build": builds,
                                                           "reason": json_values}),
        "Install": st.fixed_dictionaries({}, optional={"path": st.one_of(paths, json_values)}),
    }
    shape = draw(st.sampled_from(["own", "random", "extra", "wrong-type"]))
    if shape == "own" and short in own:
        return draw(own[short])
    if shape == "wrong-type":
        return draw(st.one_of(st.lists(json_values, max_size=3), scalars))
    base = draw(own[short]) if short in own else {}
    extra = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=4))
    return {**extra, **base} if shape == "extra" else extra


@st.composite
def plausible(draw: st.DrawFn) -> dict[str, Any]:
    """A call a confused but well-behaved client could send: real method, own shapes."""
    method = draw(st.sampled_from([f"{IFACE}.{m}" for m in METHODS] + SERVICE))
    msg: dict[str, Any] = {"method": method, "parameters": draw(parameters_for(method))}
    if not isinstance(msg["parameters"], dict):
        msg["parameters"] = {}
    if draw(st.integers(0, 3)) == 0:
        msg[draw(st.sampled_from(["more", "oneway"]))] = draw(st.booleans())
    return msg


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any] | list[Any] | object:
    if draw(st.booleans()):
        return draw(plausible())
    method = draw(method_names)
    msg: dict[str, Any] = {}
    if draw(st.integers(0, 11)):  # 1 in 12 has no method at all
        msg["method"] = method
    if draw(st.integers(0, 9)):
        msg["parameters"] = draw(parameters_for(method))
    for flag in ("more", "oneway", "upgrade"):
        if draw(st.integers(0, 5)) == 0:
            msg[flag] = draw(st.one_of(st.booleans(), json_values))
    if draw(st.integers(0, 7)) == 0:
        msg.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    if draw(st.integers(0, 15)) == 0:
        not_an_object: object = draw(st.one_of(st.lists(json_values, max_size=3), scalars))
        return not_an_object
    return msg


def might_be_accepted_mutation(msg: object) -> bool:
    """A BootStart the daemon may accept (it would record a boot): left out (see doc).

    Conservative: any build equal to next_boot (or none) with a positive integer pid
    (or none) counts, whatever else the message holds.
    """
    if not isinstance(msg, dict) or msg.get("method") != f"{IFACE}.BootStart":
        return False
    params = msg.get("parameters")
    if params is None:
        return True
    if not isinstance(params, dict):
        return False
    build, pid = params.get("build"), params.get("pid")
    build_ok = build is None or (isinstance(build, dict) and build.get("release") == RELEASE
                                 and build.get("patch") == 0)
    pid_ok = pid is None or (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0)
    return build_ok and pid_ok


def encode(msg: object) -> bytes:
    """JSON as a lax client would write it (NaN/Infinity allowed); never a raw NUL."""
    try:
        return json.dumps(msg, allow_nan=True).encode("utf-8", "surrogatepass")
    except RecursionError:  # pragma: no cover - max_leaves keeps this away
        return b"[]"


# --- the fuzz tests ----------------------------------------------------------------------


@FUZZ
@given(msg=messages(), cuts=st.lists(st.integers(0, 1 << 16), max_size=4),
       terminated=st.sampled_from([True] * 19 + [False]))
def test_fuzzed_calls_change_nothing(daemon: DaemonProcess, msg: object, cuts: list[int],
                                     terminated: bool) -> None:
    """Random calls (any method, any parameters, split writes) never change state or
    stop the daemon, and are answered with varlink messages."""
    if might_be_accepted_mutation(msg):
        STATS["skipped valid BootStart"] += 1
        return
    body = encode(msg)
    data = body + (b"\0" if terminated else b"")   # about 1 in 20 left unterminated
    before = state_snapshot(daemon)
    replies = exchange(daemon, splits(data, cuts))
    oneway = isinstance(msg, dict) and msg.get("oneway") is True
    kind = check_reply(replies)
    if terminated and not oneway and replies is None:
        # Only a message that is not a call at all may be dropped without an answer.
        raise AssertionError(f"a call got no reply: {data[:300]!r}")
    STATS[f"calls {kind}"] += 1
    after_example(daemon, before, data)


@FUZZ
@given(raw=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=5),
       terminated=st.booleans(),
       prefix=st.sampled_from([b"", b"{", b'{"method":', b"\xef\xbb\xbf"]))
def test_fuzzed_bytes_change_nothing(daemon: DaemonProcess, raw: bytes, cuts: list[int],
                                     terminated: bool, prefix: bytes) -> None:
    """Random NUL-free bytes (terminated or not) never change state or stop the daemon."""
    data = prefix + raw.replace(b"\0", b"") + (b"\0" if terminated else b"")
    before = state_snapshot(daemon)
    replies = exchange(daemon, splits(data, cuts))
    STATS[f"bytes {check_reply(replies)}"] += 1
    after_example(daemon, before, data)


def test_pipelined_garbage_then_call(daemon: DaemonProcess) -> None:
    """A valid call pipelined behind bad ones on one connection is still answered in order."""
    before = state_snapshot(daemon)
    data = (b'{"method":"com.example.Nope.X","parameters":{}}\0'
            + json.dumps({"method": f"{IFACE}.GetStatus", "parameters": 5}).encode() + b"\0"
            + json.dumps({"method": f"{IFACE}.GetStatus"}).encode() + b"\0")
    replies = exchange(daemon, [data])
    assert replies is not None
    decoded = [json.loads(r) for r in replies]
    assert decoded[0]["error"] == "org.varlink.service.InterfaceNotFound", decoded
    assert decoded[1]["error"] == "org.varlink.service.InvalidParameter", decoded
    assert decoded[2]["parameters"]["app"] == "kiosk", decoded
    after_example(daemon, before, data)


def test_oversized_request_is_refused(daemon: DaemonProcess) -> None:
    """A request over 1 MiB is answered with InvalidParameter and dropped; nothing changes."""
    before = state_snapshot(daemon)
    data = json.dumps({"method": f"{IFACE}.GetStatus",
                       "parameters": {"x": "a" * (1 << 20)}}).encode() + b"\0"
    replies = exchange(daemon, [data[i:i + 65536] for i in range(0, len(data), 65536)])
    assert replies is not None
    assert json.loads(replies[0])["error"] == "org.varlink.service.InvalidParameter"
    after_example(daemon, before, data[:100])


def test_fuzz_summary(daemon: DaemonProcess) -> None:
    """The fuzz ran its examples against a daemon that is still the same process."""
    assert daemon.proc is not None and daemon.proc.poll() is None
    calls = sum(n for k, n in STATS.items() if k.startswith(("calls ", "skipped ")))
    raw = sum(n for k, n in STATS.items() if k.startswith("bytes "))
    print(f"\nsocket fuzz: {calls} calls and {raw} byte strings, "
          f"{dict(sorted(STATS.items()))}")
    if STATS:  # the fuzz tests ran in this session (not deselected)
        assert calls >= EXAMPLES and raw >= EXAMPLES, STATS


def test_boot_start_with_huge_pid_keeps_the_daemon_up(tmp_path: Path) -> None:
    """BootStart with a pid no Linux process can have is refused as InvalidParameter;
    nothing is recorded and the daemon keeps serving."""
    release = write_tree(tmp_path / "opt" / "kiosk", {"bin/kiosk": "x"}, version=RELEASE)
    d = DaemonProcess(tmp_path / "d", manifest_url=str(tmp_path / "none.json"),
                      keys=["ed25519:" + "A" * 43 + "="], release_dir=release)
    d.start()
    try:
        for pid in (2**31, 2**22 + 1, 2**64):
            with pytest.raises(VarlinkError) as err:
                d.call("BootStart", {"pid": pid})
            assert err.value.name == "org.varlink.service.InvalidParameter"
        status = d.status()
        assert status["currently_booting"] is None
        assert status["next_boot"] == {"release": RELEASE, "patch": 0}
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.close()
