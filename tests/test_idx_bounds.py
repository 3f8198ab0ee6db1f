"""Compressed inputs are read with size bounds: an IDX file's header is checked before its payload is
decompressed, and no more than the payload it announces (plus one byte) is ever read."""

from __future__ import annotations

import gzip
import io

import pytest

from infodistill.data import formats
from infodistill.errors import UserInputError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (the MNIST/Fashion-MNIST image files)


def _bomb(path, shape, payload_bytes: int) -> None:
    """A gzip IDX file: the header announcing ``shape``, then ``payload_bytes`` zeros (which compress ~1000x)."""
    with gzip.open(path, "wb") as handle:
        handle.write(IMAGES_MAGIC.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in shape))
        chunk = bytes(1 << 20)
        for _ in range(payload_bytes >> 20):
            handle.write(chunk)


class _Counting(io.RawIOBase):
    """Wraps a byte stream and counts what was read from it."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def read(self, size=-1):
        data = self.inner.read(size)
        self.count += len(data)
        return data

    def __exit__(self, *exc):
        self.inner.close()


def _counting_open(monkeypatch):
    opened = []
    original = formats._open_maybe_gzip

    def counting(path):
        opened.append(_Counting(original(path)))
        return opened[-1]

    monkeypatch.setattr(formats, "_open_maybe_gzip", counting)
    return opened


def test_a_payload_longer_than_the_header_is_refused_without_decompressing_it(tmp_path, monkeypatch):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _bomb(path, (2, 2, 2), payload_bytes=64 << 20)  # 8 bytes announced, 64 MiB inside, ~64 KiB on disk
    opened = _counting_open(monkeypatch)
    with pytest.raises(UserInputError, match="longer than its header says"):
        formats.read_idx(path, IMAGES_MAGIC)
    assert opened[0].count == 16 + 8 + 1  # magic and sizes, the 8 announced bytes, one more


def test_a_header_announcing_more_than_the_bound_is_refused_after_the_header(tmp_path, monkeypatch):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _bomb(path, (100_000, 1_000, 1_000), payload_bytes=4 << 20)  # announces 1e11 bytes
    opened = _counting_open(monkeypatch)
    with pytest.raises(UserInputError, match="more than the 4294967296 this reader accepts"):
        formats.read_idx(path, IMAGES_MAGIC)
    assert opened[0].count == 16
