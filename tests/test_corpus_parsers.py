"""Parsers for the registry formats, on tiny inputs built here in the real binary layouts."""

import bz2
import gzip
import io
import struct
import tarfile
import zlib

import pytest

from finemoe.data.fetch import Archive, Package, fetch
from finemoe.data.rdata import read_lazyload, unserialize
from finemoe.data.sources import _sword
from finemoe.data.sword import osis_to_text, parse_conf, read_testaments, split_units
from finemoe.errors import DataError

# ---- R serialization (XDR, version 3), written the way R writes it --------------------------------


def _i(v):
    return struct.pack(">i", v)


def _charsxp(s, latin1=False):
    if s is None:
        return _i(9) + _i(-1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    return _i(9 | ((4 if latin1 else 8) << 12)) + _i(len(raw)) + raw


def _strsxp(items, latin1=False):
    return _i(16) + _i(len(items)) + b"".join(_charsxp(s, latin1) for s in items)


def _names_attr(names):  # pairlist (names = <STRSXP>), tag is a symbol
    return _i(2 | 0x400) + _i(1) + _charsxp("names") + _strsxp(names) + _i(254)


def _named_list(d):
    body = b"".join(d.values())
    return _i(19 | 0x200) + _i(len(d)) + body + _names_attr(list(d))


def _rds(item):
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + item


def _lazyload_db(objects):
    rdb, variables = b"", {}
    for name, lines in objects.items():
        ser = _rds(_strsxp(lines))
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        variables[name] = _i(13) + _i(2) + _i(len(rdb)) + _i(len(blob))
        rdb += blob
    index = _named_list(
        {
            "variables": _named_list(variables),
            "references": _i(19) + _i(0),
            "compressed": _i(10) + _i(1) + _i(1),
        }
    )
    return gzip.compress(_rds(index)), rdb


def test_lazyload_reads_character_vectors():
    rdx, rdb = _lazyload_db({"emma": ["EMMA", "", "By Jane Austen", None], "tiny": ["a \u00e9 b"]})
    out = read_lazyload(rdx, rdb)
    assert list(out) == ["emma", "tiny"]
    assert out["emma"] == ["EMMA", "", "By Jane Austen", None]
    assert out["tiny"] == ["a \u00e9 b"]


def test_lazyload_latin1_strings_and_errors():
    assert unserialize(_rds(_strsxp(["caf\u00e9"], latin1=True))) == ["caf\u00e9"]
    with pytest.raises(DataError, match="XDR"):
        unserialize(b"A\n" + b"\0" * 20)
    rdx, rdb = _lazyload_db({"x": ["hello"]})
    with pytest.raises(DataError, match="truncated|damaged|Error"):
        read_lazyload(rdx, rdb[:-5])


# ---- SWORD modules ------------------------------------------------------------------------------


def _module(blocks, verses, compress=zlib.compress, wide=False):
    """(.?zs, .?zz, .?zv) bytes for raw blocks and (block, start, size) verse entries."""
    zz, zs = b"", b""
    for raw in blocks:
        c = compress(raw)
        zs += struct.pack("<III", len(zz), len(c), len(raw))
        zz += c
    fmt = "<III" if wide else "<IIH"
    return zs, zz, b"".join(struct.pack(fmt, *v) for v in verses)


BOOK1 = (
    '<div osisID="Gen" sID="g1" type="book"/><title type="main">Genesis</title>'
    '<chapter osisID="Gen.1" sID="Gen.1"/>'
)
V1 = '<w lemma="strong:H1">In</w> <w lemma="strong:H2">the</w> <w>beginning</w><note type="x">a note</note>.'
V2 = 'The <w lemma="x">cities</w>, <w lemma="y">and</w> the <hi type="bold">plain</hi>.'
BOOK2 = '<div osisID="Exod" sID="g2" type="book"/><chapter osisID="Exod.1" sID="Exod.1"/>'
V3 = "Now these are the names&amp;more."


def _web_like(compress=zlib.compress, wide=False):
    b0 = b'<milestone type="x-importer"/>'
    b1 = (BOOK1 + V1 + V2).encode()
    b2 = (BOOK2 + V3).encode()
    stale = V2.replace("cities", "CITIES").encode()  # an old copy of an edited verse: not in the index
    o1, o2 = len(BOOK1.encode()), len((BOOK1 + V1).encode())
    verses = [
        (0, 0, 0),
        (0, 0, len(b0)),
        (1, 0, o1),
        (1, o1, o2 - o1),
        (1, o2, len(b1) - o2),
        (1, o2, len(b1) - o2),  # a linked verse: same entry twice, read once
        (2, 0, len(BOOK2.encode())),
        (2, len(BOOK2.encode()), len(V3.encode())),
    ]
    return _module([b0, b1, b2, stale], verses, compress, wide)


@pytest.mark.parametrize(
    "kind,compress,drv,wide",
    [
        ("ZIP", zlib.compress, "zText", False),
        ("BZIP2", bz2.compress, "zText", False),
        ("ZIP", zlib.compress, "zCom4", True),
        ("ZIP", zlib.compress, "zCom4", False),
    ],
)  # zCom4 with 10-byte entries
def test_sword_module_reads_verse_index_in_order(kind, compress, drv, wide):
    zs, zz, zv = _web_like(compress, wide)
    conf = parse_conf(f"[Test]\nModDrv={drv}\nCompressType={kind}\nBlockType=BOOK\n")
    osis = read_testaments(conf, {"ot.bzs": zs, "ot.bzz": zz, "ot.bzv": zv})["ot"]
    assert "CITIES" not in osis and osis.count("cities") == 1
    units = split_units(osis)
    assert [n for n, _ in units] == ["front", "Gen", "Exod"]
    gen = osis_to_text(units[1][1])
    assert gen == "Genesis\n\nIn the beginning. The cities, and the plain."
    assert osis_to_text(units[2][1]) == "Now these are the names&more."


def test_sword_chapter_units_and_end_markers():
    osis = (
        '<div osisID="Ps" sID="a" type="book"/>Preface. <chapter osisID="Ps.1" sID="Ps.1"/>One. '
        '<chapter osisID="Ps.2" sID="Ps.2"/>Two. <div eID="a" osisID="Ps" type="book"/> Glossary.'
    )
    assert [n for n, _ in split_units(osis, "chapter")] == ["front", "Ps", "Ps.1", "Ps.2", "after-Ps"]
    assert [n for n, _ in split_units(osis, "book")] == ["front", "Ps", "after-Ps"]


def test_osis_cleaning_joins_words_without_spaces():
    s = (
        '<w lemma="strong:H5892">cities</w>, <w lemma="a">and</w> <note placement="foot">'
        '<reference>1:1</reference>note text</note>villages<note n="b"/>; '
        '<l level="1" sID="x"/>a line<l eID="x" level="1"/><l level="2" sID="y"/>next line<l eID="y"/>'
    )
    text = osis_to_text(s)
    assert "cities, and villages;" in text and "cities ," not in text and "note" not in text
    assert text.splitlines()[-1] == "next line" and "a line" in text.splitlines()


def test_sword_errors_are_clear():
    zs, zz, zv = _web_like()
    with pytest.raises(DataError, match="CompressType=LZSS"):
        read_testaments({"CompressType": "LZSS", "BlockType": "BOOK"}, {"ot.bzs": zs})
    with pytest.raises(DataError, match="does not decompress"):
        read_testaments({"BlockType": "BOOK"}, {"ot.bzs": zs, "ot.bzz": b"x" * len(zz), "ot.bzv": zv})
    with pytest.raises(DataError, match="verse index"):
        read_testaments({"BlockType": "BOOK"}, {"ot.bzs": zs, "ot.bzz": zz, "ot.bzv": zv[:-3]})


# ---- package archives: a .deb built here, read by the SWORD source reader -----------------------


def _deb(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, data in [("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())]:
        out += (
            f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
            + data
            + (b"\n" if len(data) % 2 else b"")
        )
    return out


def test_deb_archive_and_sword_source(tmp_path):
    zs, zz, zv = _web_like()
    conf = (
        b"[engTest]\nDataPath=./modules/texts/ztext/engtest/\nModDrv=zText\nCompressType=ZIP\n"
        b"BlockType=BOOK\n"
    )
    base = "usr/share/sword/modules/texts/ztext/engtest/"
    deb = tmp_path / "sword-text-test_1.0_all.deb"
    deb.write_bytes(
        _deb(
            {
                "usr/share/sword/mods.d/engtest.conf": conf,
                base + "ot.bzs": zs,
                base + "ot.bzz": zz,
                base + "ot.bzv": zv,
            }
        )
    )
    docs = list(_sword("engtest", "test", "book")(Archive(deb)))
    assert [d.key for d in docs] == ["test/ot/Gen", "test/ot/Exod"]
    assert docs[0].text.endswith("The cities, and the plain.")


def test_cached_download_is_reused_and_checked(tmp_path):
    pkg = Package("pypi", "nothing", "1.0", "nothing-1.0.tar.gz", "0" * 64)
    (tmp_path / "pypi").mkdir()
    (tmp_path / "pypi" / pkg.filename).write_bytes(b"not the pinned bytes")
    with pytest.raises(DataError, match="delete it to download again"):
        fetch(pkg, tmp_path)
    ok = Package("pypi", "nothing", "1.0", "nothing-1.0.tar.gz", None)
    assert fetch(ok, tmp_path) == tmp_path / "pypi" / pkg.filename  # no download attempted
