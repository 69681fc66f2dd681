"""The partial file's writes: whole blocks go to the disk directly (``O_DIRECT``, no
copy into the page cache), everything else through the cache, and the file is the exact
stream either way, resumed at any offset.

Whether a page is in the page cache is the kernel's own answer (``mincore`` on a
mapping of the file), so these tests see the direct writes themselves.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import mmap
import os
from pathlib import Path

import pytest

from patchd.fetch.partial import DIRECT_ALIGN, PartialFile, _open_direct
from patchd.fetch.sources import LocalSource

PAGE = mmap.PAGESIZE
MiB = 1024 * 1024
DATA = os.urandom(6 * MiB + 1234)  # a tail that is not a whole block


def cached_pages(path: Path, start: int = 0, end: int | None = None) -> int:
    """How many pages of ``path`` between ``start`` and ``end`` the page cache holds
    (``mincore`` on a shared read-only mapping, which faults nothing in)."""
    size = path.stat().st_size
    end = size if end is None else end
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    with path.open("rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    return sum(vec.raw[i] & 1 for i in range(start // PAGE, (end + PAGE - 1) // PAGE))


def drop_cache(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def aligned_buffer(data: bytes) -> memoryview:
    """``data`` in page-aligned memory, as the pump's buffers are."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """A directory on a file system with ``O_DIRECT`` (the tests' own precondition)."""
    probe = tmp_path / "probe"
    probe.touch()
    fd = _open_direct(probe)
    assert fd >= 0, f"{tmp_path}: no O_DIRECT here; these tests need a file system with it"
    os.close(fd)
    probe.unlink()
    return tmp_path


def write_all(dest: Path, pieces: list[memoryview | bytes], offset: int = 0) -> str:
    part = PartialFile.open(dest, offset, len(DATA))
    try:
        for piece in pieces:
            part.write(memoryview(piece))
            part.hash(memoryview(piece))
        return part.finish()
    finally:
        part.close()


def test_whole_blocks_from_aligned_memory_bypass_the_page_cache(direct_dir: Path) -> None:
    dest = direct_dir / "b.patchd"
    step = MiB
    pieces = [aligned_buffer(DATA[i:i + step]) for i in range(0, len(DATA), step)]
    digest = write_all(dest, pieces)
    assert digest == hashlib.sha256(DATA).hexdigest()
    assert dest.read_bytes() == DATA
    drop_cache(dest)  # what read_bytes brought in
    # Written again the same way: only the tail's page (not a whole block) is cached.
    write_all(dest, [aligned_buffer(DATA[i:i + step]) for i in range(0, len(DATA), step)])
    assert cached_pages(dest) <= 1, "whole blocks were copied into the page cache"


def test_unaligned_memory_offsets_and_lengths_land_byte_exact(direct_dir: Path) -> None:
    dest = direct_dir / "b.patchd"
    # Every shape a write can have: bytes (read-only memory), a buffer that starts off a
    # page, lengths that leave the file off a block boundary, then aligned ones again.
    cuts = [0, 100, 100 + DIRECT_ALIGN, 3 * MiB, 3 * MiB + 1, 4 * MiB + 7, 5 * MiB,
            len(DATA)]
    pieces: list[memoryview | bytes] = []
    for n, (a, b) in enumerate(itertools.pairwise(cuts)):
        chunk = DATA[a:b]
        if n % 3 == 0:
            pieces.append(chunk)
        elif n % 3 == 1:
            pieces.append(aligned_buffer(chunk))
        else:
            off_page = mmap.mmap(-1, len(chunk) + 1)
            off_page[1:] = chunk
            pieces.append(memoryview(off_page)[1:])
    assert write_all(dest, pieces) == hashlib.sha256(DATA).hexdigest()
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("offset", [1, DIRECT_ALIGN - 1, 2 * MiB + 5, 2 * MiB])
def test_a_resume_at_any_offset_continues_the_stream(direct_dir: Path, offset: int) -> None:
    dest = direct_dir / "b.patchd"
    dest.write_bytes(DATA[:offset] + b"garbage past the resume point")
    rest = [aligned_buffer(DATA[i:i + MiB]) for i in range(offset, len(DATA), MiB)]
    assert write_all(dest, rest, offset) == hashlib.sha256(DATA).hexdigest()
    assert dest.read_bytes() == DATA


@pytest.mark.anyio
@pytest.mark.parametrize("offset", [12345, 2 * MiB + 1])
async def test_a_download_resumed_off_a_block_boundary_realigns(
        direct_dir: Path, offset: int) -> None:
    """The pump's first buffer after an unaligned resume stops at the next block
    boundary, so every later buffer is written directly: the page cache holds at most
    the pages around the resume point and the tail."""
    repo = direct_dir / "repo"
    repo.mkdir()
    (repo / "manifest.json").write_text("{}")
    (repo / "b.patchd").write_bytes(DATA)
    dest = direct_dir / "b.partial"
    dest.write_bytes(DATA[:offset])
    drop_cache(dest)
    async with LocalSource(str(repo / "manifest.json")) as src:
        await src.download(str(repo / "b.patchd"), dest, size=len(DATA),
                           sha256=hashlib.sha256(DATA).hexdigest(), offset=offset,
                           progress=None)
    boundary = offset + (-offset) % DIRECT_ALIGN
    tail = len(DATA) - len(DATA) % DIRECT_ALIGN
    assert cached_pages(dest, boundary, tail) == 0, "the stream was not realigned"
    assert dest.read_bytes() == DATA
