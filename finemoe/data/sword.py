"""Read SWORD Bible and commentary modules (zText / zCom drivers) and turn their OSIS markup into text.

A module is `mods.d/NAME.conf` plus, per testament (`ot`, `nt`), three files named by block type
(`b` = a block per book, `c` = per chapter): `?zs` the block index (12-byte little-endian
`offset, compressed size, raw size` per block), `?zz` the compressed blocks, `?zv` the verse index
(`block, start, size` per verse; 10 bytes with a 2-byte size, 12 bytes in the *4 drivers). The
text is cut into documents where OSIS marks a book (or a chapter) start: a Bible book, a commentary
book, or one Psalm's commentary.
"""

from __future__ import annotations

import bz2
import html
import lzma
import re
import struct
import zlib

from finemoe.errors import DataError

_DECOMPRESS = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress, "XZ": lzma.decompress}


def parse_conf(text: str) -> dict[str, str]:
    conf, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            conf["name"] = section
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            conf.setdefault(key.strip(), value.strip())
    return conf


def read_testaments(conf: dict[str, str], files: dict[str, bytes]) -> dict[str, str]:
    """{'ot'/'nt': OSIS text of every verse entry in index order}; `files` maps e.g. 'ot.bzs' -> bytes.

    The verse index, not the raw blocks, is the truth: a module rewritten in place keeps stale copies
    of edited verses in later blocks, and linked verses (a commentary on "Verses 3-12") share one
    entry. So each distinct (block, start, size) entry is read once, in canonical order."""
    compress = conf.get("CompressType", "ZIP").upper()
    if compress not in _DECOMPRESS:
        raise DataError(
            f"SWORD module {conf.get('name')}: CompressType={compress} is not supported (ZIP, BZIP2, XZ)"
        )
    prefix = {"BOOK": "b", "CHAPTER": "c", "VERSE": "v"}.get(conf.get("BlockType", "CHAPTER").upper(), "c")
    wide = conf.get("ModDrv", "").endswith("4")
    out = {}
    for testament in ("ot", "nt"):
        idx, data, verses = (files.get(f"{testament}.{prefix}z{k}", b"") for k in "szv")
        if not idx:
            continue
        if len(idx) % 12:
            raise DataError(
                f"SWORD block index {testament}.{prefix}zs is {len(idx)} bytes, not a multiple of 12"
            )
        raw = []
        for i, (off, size, usize) in enumerate(struct.iter_unpack("<III", idx)):
            try:
                b = _DECOMPRESS[compress](data[off : off + size])
            except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(
                    f"SWORD block {i} of {testament}.{prefix}zz does not decompress: {e}"
                ) from None
            if len(b) != usize:
                raise DataError(
                    f"SWORD block {i} of {testament}.{prefix}zz is {len(b)} bytes, its index says {usize}"
                )
            raw.append(b)
        seen, pieces = set(), []
        for entry in _verse_entries(verses, raw, wide):
            if entry[2] and entry not in seen:
                seen.add(entry)
                blk, start, size = entry
                pieces.append(raw[blk][start : start + size].decode("utf-8", errors="replace"))
        out[testament] = " ".join(pieces)  # a space so adjacent verses never run together
    return out


def _verse_entries(verses: bytes, raw: list[bytes], wide: bool) -> list[tuple[int, int, int]]:
    """(block, start, size) per verse. Some modules say zCom4 but carry 10-byte entries, so the
    width is the one whose entries all fall inside their blocks."""
    for width in (12, 10) if wide else (10, 12):
        if len(verses) % width:
            continue
        entries = list(struct.iter_unpack("<III" if width == 12 else "<IIH", verses))
        if all(
            size == 0 or (blk < len(raw) and start + size <= len(raw[blk])) for blk, start, size in entries
        ):
            return entries
    raise DataError(
        f"SWORD verse index ({len(verses)} bytes) matches neither the 10- nor the 12-byte entry layout"
    )


_BOOK = re.compile(r'<div\b[^>]*\btype="book"[^>]*>')
_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=[^>]*>")
_OSIS_ID = re.compile(r'osisID="([^"]+)"')


def split_units(osis: str, unit: str = "book") -> list[tuple[str, str]]:
    """[(name, OSIS)] cut where a book (or, with unit='chapter', also a chapter) starts or ends.

    A unit is named by its osisID; text before the first one (a preface) is 'front', and text after
    a book's end marker (a glossary) is 'after-BOOK'."""
    pattern = _BOOK if unit == "book" else re.compile(f"{_BOOK.pattern}|{_CHAPTER.pattern}")
    cuts = []
    for m in pattern.finditer(osis):
        osis_id = _OSIS_ID.search(m.group(0))
        if osis_id:
            ends = "eID=" in m.group(0)
            cuts.append((m.start(), f"after-{osis_id.group(1)}" if ends else osis_id.group(1)))
    parts = [("front", osis[: cuts[0][0]] if cuts else osis)]
    for (pos, name), nxt in zip(cuts, [c[0] for c in cuts[1:]] + [len(osis)]):
        parts.append((name, osis[pos:nxt]))
    return parts


_NOTE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_BREAK = re.compile(r"<(?:chapter|div|p|lb|l|lg|list|item|br)\b[^>]*>|</(?:p|l|lg|div|list|item)>", re.S)
_TAG = re.compile(r"<[^>]*>")


def osis_to_text(osis: str) -> str:
    """Plain text from OSIS: notes dropped, word tags removed without adding spaces, blocks on new lines."""
    s = _NOTE.sub("", osis)
    s = _TITLE.sub(lambda m: f"\n{m.group(1)}\n", s)
    s = _BREAK.sub("\n", s)
    s = _TAG.sub("", s)  # <w>, <hi>, <q>, <milestone/>...: inline, so no space is inserted
    s = html.unescape(s)
    s = re.sub(r"[ \t\r\f\v\u00a0]+", " ", s)
    s = re.sub(r" ?\n ?", "\n", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()
