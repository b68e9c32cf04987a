"""Documents, user text files, and the train/validation split by whole documents.

A document is the unit a reader would name: one speech, play, novel, commentary book, Bible book or
JSONL record. Validation text must come from documents the model never trained on, so the split
assigns whole documents: a document is held out when the sha256 of "source/name" falls below
val_fraction. That depends on the name only, not on order or content, so adding a source or fixing a
typo in one text never moves other documents between the splits.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from finemoe.errors import DataError

EOT = "<|endoftext|>"


@dataclass
class Document:
    source: str
    name: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}/{self.name}"


def clean_text(text: str) -> str:
    """One canonical form for every source: NFC, LF line ends, no BOM or trailing spaces."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # 1990s Gutenberg files are Windows-1252


def read_inputs(paths: list[str | Path]) -> list[Document]:
    """Documents from user files: a .jsonl record's "text" is one document; a text file is one, or
    several where it contains <|endoftext|> separators."""
    if not paths:
        raise DataError("no input files given")
    docs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"input file {p} not found")
        raw = p.read_bytes()
        if p.suffix == ".jsonl":
            for i, line in enumerate(raw.decode("utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{p}:{i + 1} is not valid JSON ({e.msg}); each line must be one JSON object"
                    ) from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(
                        f'{p}:{i + 1} has no string field "text"; each line must be {{"text": "..."}}'
                    )
                docs.append(Document(p.name, f"{i + 1}", clean_text(rec["text"])))
        else:
            parts = decode(raw, str(p)).split(EOT)
            for j, part in enumerate(parts):
                docs.append(Document(p.name, str(j + 1) if len(parts) > 1 else "all", clean_text(part)))
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"the input files ({', '.join(map(str, paths))}) hold no text")
    return docs


def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document], str]:
    """(train, val, how): whole documents by name hash; see the module docstring.

    With a single document there is nothing to hold out whole, so its last val_fraction of lines
    (at a line break) is the validation text; `how` says which rule was used."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(docs), [], "none"
    if len(docs) == 1:
        d = docs[0]
        cut = d.text.rfind("\n", 0, int(len(d.text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(d.text) * (1 - val_fraction))
        head, tail = d.text[:cut].strip("\n"), d.text[cut:].strip("\n")
        if not head or not tail:
            raise DataError(
                f"{d.key} is too short to split into train and validation; give more text or --val-fraction 0"
            )
        return (
            [Document(d.source, d.name, head)],
            [Document(d.source, d.name + "#tail", tail)],
            "tail of the only document",
        )
    keys = [_unit(d.key) for d in docs]
    val = [d for d, u in zip(docs, keys) if u < val_fraction]
    if not val:  # few documents: hold out the one closest to the threshold so validation is never empty
        val = [docs[min(range(len(docs)), key=keys.__getitem__)]]
    held = {id(d) for d in val}
    train = [d for d in docs if id(d) not in held]
    if not train:
        raise DataError("every document fell into validation; use a smaller --val-fraction")
    return train, val, f"sha256(source/name) < {val_fraction}"
