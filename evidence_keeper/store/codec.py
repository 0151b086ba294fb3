"""Segment bodies: the raw stream bytes, compressed, nothing added or removed.

Compression is deterministic (gzip with ``mtime=0``; zstd frames carry the content size), so
a re-upload after a crash produces the same object for the same key.

Decompression is *bounded* (CONTRACT.md section 4): a body is only ever expanded by streaming,
a chunk at a time, and never beyond the length its key and ``ek-length`` claim, which itself
may not exceed :data:`MAX_SEGMENT_BYTES`. A 64 KiB zstd frame of zeros that expands to
gigabytes, a gzip bomb, a concatenation of frames or members, or a body longer or shorter
than it claims is a :class:`BodyError` (one line) after at most ``expected + 1`` bytes of
output, so readers (export, search, verify, archive bundles, replay) hold at most one chunk
(or one segment, when they must check its hash before using it) in memory.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from typing import Final

import zstandard

from evidence_keeper.model import SEGMENT_EXTENSIONS

# Segments are sealed at segment_max_bytes (8 MiB by default); a claim above this cap is taken
# for a forged key, and the cap is the most any reader will ever expand one object to. (A
# segment_max_bytes above it would write segments no reader accepts: keep it below.)
MAX_SEGMENT_BYTES: Final = 256 * 1024 * 1024
CHUNK: Final = 1 << 20  # decompressed bytes produced per step
# Compression levels up to 19 use windows of at most 8 MiB; a frame asking for more is hostile
# (the decompressor would allocate it) and is refused by zstd itself.
ZSTD_MAX_WINDOW: Final = 32 * 1024 * 1024
_GZIP_MAGIC: Final = b"\x1f\x8b"


class BodyError(ValueError):
    """A stored body that is not the segment it claims to be (``str()`` is one line)."""


def extension(compression: str) -> str:
    return SEGMENT_EXTENSIONS[compression]


def compress(data: bytes, compression: str, level: int) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if compression == "gzip":
        return gzip.compress(data, compresslevel=level, mtime=0)
    raise ValueError(f"unknown compression {compression!r}")


def compressed_bound(length: int) -> int:
    """The most bytes a body of ``length`` raw bytes can take compressed (zstd or gzip).

    Both formats expand incompressible data by well under 1 % (zstd: n/256 + 128 KiB/2048;
    deflate stored blocks: 5 bytes per 64 KiB) plus a header; a larger object is not a segment.
    """
    return length + length // 64 + 64 * 1024


def check_claim(expected: int) -> None:
    if expected < 0 or expected > MAX_SEGMENT_BYTES:
        raise BodyError(f"claims {expected} bytes, more than the {MAX_SEGMENT_BYTES} bytes a"
                        " segment can hold (a forged key or ek-length)")


def decompressed_chunks(body: bytes, ext: str, *, expected: int | None,
                        chunk: int = CHUNK) -> Iterator[bytes]:
    """The raw bytes of a segment body, ``chunk`` at a time, by key extension.

    With ``expected`` (the key's and ``ek-length``'s length) the output must be exactly that
    long: one byte more stops the expansion with :class:`BodyError` ("a decompression bomb"),
    and an early end is one too. ``expected=None`` bounds the output by
    :data:`MAX_SEGMENT_BYTES` only. A consumer may stop early (e.g. at the first newline).
    """
    limit = MAX_SEGMENT_BYTES if expected is None else expected
    check_claim(limit)
    if ext == "zst":
        parts = _zstd_chunks(body, limit + 1, chunk)
    elif ext == "gz":
        parts = _gzip_chunks(body, limit + 1, chunk)
    else:
        raise BodyError(f"unknown segment extension {ext!r}")
    produced = 0
    for part in parts:
        produced += len(part)
        if produced > limit:
            what = f"the {expected} bytes it claims" if expected is not None else (
                f"the {MAX_SEGMENT_BYTES}-byte cap")
            raise BodyError(f"decompresses to more than {what} (a decompression bomb or a"
                            " forged object); stopped after"
                            f" {produced} bytes")
        yield part
    if expected is not None and produced != expected:
        raise BodyError(f"decompresses to {produced} bytes, not the {expected} it claims")


def _zstd_chunks(body: bytes, budget: int, chunk: int) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    try:
        # read_across_frames: a second frame appended to a body is data, not ignored junk.
        with dctx.stream_reader(body, read_across_frames=True) as reader:
            while budget > 0:
                data = reader.read(min(chunk, budget))
                if not data:
                    return
                budget -= len(data)
                yield data
    except zstandard.ZstdError as exc:
        raise BodyError(f"corrupt zstd body: {exc}") from None


def _gzip_chunks(body: bytes, budget: int, chunk: int) -> Iterator[bytes]:
    """gzip members one after another (as ``gzip.decompress`` reads them), bounded."""
    rest = body
    while rest and budget > 0:
        if rest[:2] != _GZIP_MAGIC:
            raise BodyError("corrupt gzip body: not a gzip member (trailing garbage?)")
        d = zlib.decompressobj(wbits=31)
        data = rest
        while budget > 0:
            try:
                out = d.decompress(data, min(chunk, budget))
            except zlib.error as exc:
                raise BodyError(f"corrupt gzip body: {exc}") from None
            if out:
                budget -= len(out)
                yield out
            if d.eof:
                break
            data = d.unconsumed_tail
            if not data and not out:
                raise BodyError("corrupt gzip body: truncated (the member does not end)")
        rest = d.unused_data if d.eof else b""


def decompress(body: bytes, ext: str, *, expected: int | None = None) -> bytes:
    """Inverse of :func:`compress`, by key extension (``zst`` or ``gz``), bounded.

    Holds the whole segment: for callers that must check its hash before using any of it.
    """
    out = bytearray()
    for part in decompressed_chunks(body, ext, expected=expected):
        out += part
    return bytes(out)
