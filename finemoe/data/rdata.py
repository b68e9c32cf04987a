"""Read character vectors out of an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`).

An R package's `data/` holds objects in R's own serialization, not text: `Rdata.rdx` is a
gzip-compressed serialized list {variables: {name: c(offset, length)}, compressed: ...}, and each
object in `Rdata.rdb` is `[4-byte big-endian raw length][compressed XDR serialization]`. The
unserializer below covers the types these files use (vectors, pairlists, symbols, references),
which is all a text package needs.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

from finemoe.errors import DataError

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 254, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, EMPTYENV, BASEENV, GLOBALENV, MISSINGARG = 255, 242, 241, 253, 251
NA_INT = -(2**31)


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise DataError("truncated R serialization; the .rdb/.rdx file is damaged")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind in (NILVALUE, EMPTYENV, BASEENV, GLOBALENV, MISSINGARG):
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            sym = self.item()
            self.refs.append(sym)
            return sym
        if kind == LISTSXP:  # pairlist: [attr] [tag] car cdr
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            out = [(tag, self.item())]
            rest = self.item()
            del attr
            return out + (rest or [])
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = self.take(n)
            levels = flags >> 12
            return raw.decode("latin-1" if levels & 4 else "utf-8")
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            value = [None if v == NA_INT else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (STRSXP, VECSXP):
            n = self.int()
            value = [self.item() for _ in range(n)]
        else:
            raise DataError(f"R serialization type {kind} is not supported by this reader")
        if has_attr:
            attrs = dict(self.item() or [])
            if kind == VECSXP and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def unserialize(buf: bytes):
    """Python value of one XDR ('X\\n') R serialization: lists, dicts (named lists), str/int/float."""
    if not buf.startswith(b"X\n"):
        raise DataError("not an XDR R serialization (expected header 'X\\n')")
    r = _Reader(buf)
    r.pos = 2
    version = r.int()
    r.int(), r.int()  # writer and minimal reader R versions
    if version == 3:
        r.take(r.int())  # native encoding name
    elif version != 2:
        raise DataError(f"R serialization version {version} is not supported")
    return r.item()


def _decompress(blob: bytes, compressed) -> bytes:
    (size,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    if compressed in (None, 0, False):
        out = body
    elif compressed in (1, True):
        out = zlib.decompress(body)
    else:  # types 2 and 3 carry a one-byte method tag
        method, body = body[:1], body[1:]
        out = {b"0": lambda b: b, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress}.get(
            method, lambda b: None
        )(body)
        if out is None:
            raise DataError(f"unknown R lazy-load compression tag {method!r}")
    if len(out) != size:
        raise DataError(
            f"R lazy-load object is {len(out)} bytes, its header says {size}; the .rdb file is damaged"
        )
    return out


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """{object name: value} for every object in a lazy-load database, in the index's order."""
    index = unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
    if not isinstance(index, dict) or "variables" not in index:
        raise DataError("R lazy-load index has no 'variables' entry")
    compressed = (index.get("compressed") or [1])[0]
    out = {}
    for name, (offset, length) in index["variables"].items():
        try:
            raw = _decompress(rdb[offset : offset + length], compressed)
        except (zlib.error, OSError, EOFError, lzma.LZMAError, struct.error) as e:
            raise DataError(
                f"R lazy-load object {name!r} does not decompress ({e}); the .rdb file is damaged"
            ) from None
        out[name] = unserialize(raw)
    return out
