"""The tar stream reader (llip/data/tarstream.py) against the standard library's tarfile, the oracle: the same
regular files with the same names and payloads for every format and compression tarfile writes, and clear errors
for damaged streams."""

from __future__ import annotations

import io
import tarfile

import pytest

from llip.data.tarstream import BLOCK, tar_members

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def _archive(fmt: int, compression: str = "", long_names: bool = True) -> bytes:
    """Files whose payloads end inside a block, on a block boundary, and empty; a directory, a symlink and a
    hard link (passed over); names long enough for ustar's prefix field, or for GNU ``L`` / pax ``path`` records,
    and non-ASCII names (pax). A pax archive starts with a global header."""
    buf = io.BytesIO()
    extra = {"pax_headers": {"comment": "global"}} if fmt == tarfile.PAX_FORMAT else {}
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt, **extra) as tar:

        def add(name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(payload)
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "shard/000000.txt"
            tar.addfile(info, io.BytesIO(payload))

        add("shard", kind=tarfile.DIRTYPE)
        add("shard/000000.txt", b"a caption")
        add("shard/000000.png", bytes(range(256)) * 2)  # exactly one block
        add("shard/000001.png", bytes(range(256)) * 3)  # a block and a half
        add("shard/000001.txt", b"")
        add("shard/000002.txt", kind=tarfile.SYMTYPE)
        add("shard/000003.txt", kind=tarfile.LNKTYPE)
        if long_names:
            deep = "/".join(["folder"] * 20)  # 139 characters of folders: ustar's prefix field
            add(f"{deep}/000004.txt", b"deep")
            if fmt != tarfile.USTAR_FORMAT:
                add(f"{'x' * 150}.txt", b"a name over 100 bytes")
            if fmt == tarfile.PAX_FORMAT:
                add("shard/caf\u00e9-\u65e5\u672c.txt", b"non-ASCII")
    return buf.getvalue()


def _oracle(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _ours(data: bytes) -> list[tuple[str, bytes]]:
    return list(tar_members(io.BytesIO(data)))


class _Trickle(io.RawIOBase):
    """A raw stream that returns at most 100 bytes per read, as a pipe may."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self.data.read(100 if n < 0 else min(n, 100))


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_same_members_as_tarfile(fmt, compression):
    data = _archive(FORMATS[fmt], compression)
    expected = _oracle(data)
    assert len(expected) == 5 + (fmt != "ustar") + (fmt == "pax")  # the regular files above, no link or folder
    assert _ours(data) == expected
    assert list(tar_members(_Trickle(data))) == expected


def _rewrite(data: bytes, offset: int, field: slice, value: bytes, signed: bool = False) -> bytes:
    """``data`` with the header at ``offset`` given ``value`` in ``field`` and a recomputed checksum."""
    header = bytearray(data[offset : offset + BLOCK])
    header[field] = value
    header[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in header)
    header[148:156] = b"%06o\0 " % (total & 0o777777) if total >= 0 else b"-%05o\0 " % -total
    return data[:offset] + bytes(header) + data[offset + BLOCK :]


def test_base_256_sizes_and_signed_checksums():
    data = _archive(tarfile.GNU_FORMAT, long_names=False)
    first = 512  # the header of shard/000000.txt, after the directory's
    assert data[first : first + 16].startswith(b"shard/000000.txt")
    data = _rewrite(data, first, slice(124, 136), b"\x80" + (9).to_bytes(11, "big"))  # GNU base-256, as > 8 GiB
    assert _ours(data) == _oracle(data)
    name = "shard/caf\u00e9.txt".encode()  # bytes >= 128, so the signed checksum differs from the unsigned one
    signed = _rewrite(data, first, slice(0, 100), name.ljust(100, b"\0"), signed=True)
    assert _ours(signed) == _oracle(signed) and _ours(signed)[0][0] == "shard/caf\u00e9.txt"


def test_a_stream_may_end_without_its_end_blocks():
    data = _archive(tarfile.GNU_FORMAT, long_names=False)
    expected = _ours(data)
    end = -(-len(data.rstrip(b"\0")) // BLOCK) * BLOCK  # the end of the last header (a link: no payload)
    assert end < len(data) and _ours(data[:end]) == expected


def test_damaged_streams_raise_read_errors():
    data = _archive(tarfile.GNU_FORMAT, long_names=False)
    with pytest.raises(tarfile.ReadError, match="empty file"):
        _ours(b"")
    # Blocks: the folder's header, shard/000000.txt's header and payload, shard/000000.png's header and payload, ...
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _ours(data[: 4 * BLOCK + 100])  # inside the payload of shard/000000.png
    with pytest.raises(tarfile.ReadError, match="truncated header"):
        _ours(data[: 3 * BLOCK + 100])  # inside the header of shard/000000.png
    # tarfile ends quietly at a damaged header after the first; ours raises, so a damaged shard is reported.
    corrupt = data[: 3 * BLOCK + 7] + b"X" + data[3 * BLOCK + 8 :]
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        _ours(corrupt)
    with pytest.raises(tarfile.ReadError, match="invalid header"):  # "!" where the checksum's digits belong
        _ours(b"this is not a tar file".ljust(BLOCK, b"!"))
