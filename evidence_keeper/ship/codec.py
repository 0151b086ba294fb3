"""Segment bodies: the raw stream bytes, compressed, nothing added or removed.

Compression is deterministic (gzip with ``mtime=0``; zstd frames carry the content size), so
a re-upload after a crash produces the same object for the same key.
"""

from __future__ import annotations

import gzip
import zlib

import zstandard

from evidence_keeper.model import SEGMENT_EXTENSIONS


def extension(compression: str) -> str:
    return SEGMENT_EXTENSIONS[compression]


def compress(data: bytes, compression: str, level: int) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if compression == "gzip":
        return gzip.compress(data, compresslevel=level, mtime=0)
    raise ValueError(f"unknown compression {compression!r}")


def decompress(body: bytes, ext: str) -> bytes:
    """Inverse of :func:`compress`, by key extension (``zst`` or ``gz``)."""
    if ext == "zst":
        out = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        return bytes(out)
    if ext == "gz":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"corrupt gzip body: {exc}") from exc
    raise ValueError(f"unknown segment extension {ext!r}")
