"""Documents from user files and the train/validation split by whole documents."""

import json

import pytest

from finemoe.data.corpus import EOT, Document, clean_text, read_inputs, split_documents
from finemoe.errors import DataError


def _docs(n):
    return [Document("s", f"doc{i}", f"text of document {i}\nsecond line") for i in range(n)]


def test_split_keeps_documents_whole_and_is_deterministic():
    docs = _docs(200)
    train, val, rule = split_documents(docs, 0.1)
    assert "sha256" in rule and 5 < len(val) < 40 and len(train) + len(val) == 200
    assert {d.key for d in train}.isdisjoint({d.key for d in val})
    assert all(d in docs for d in train + val)  # the same objects: no document was cut
    again = split_documents(list(reversed(docs)), 0.1)[1]
    assert {d.key for d in again} == {d.key for d in val}  # order does not matter
    more = split_documents(docs + _docs(300)[200:], 0.1)[1]
    assert {d.key for d in val} <= {d.key for d in more}  # adding documents moves none of the old ones


def test_split_never_leaves_validation_empty_and_handles_one_document():
    train, val, _ = split_documents(_docs(3), 0.01)
    assert len(val) == 1 and len(train) == 2
    one = [Document("f.txt", "all", "\n".join(f"line {i}" for i in range(100)))]
    train, val, rule = split_documents(one, 0.1)
    assert rule == "tail of the only document"
    assert train[0].text + "\n" + val[0].text == one[0].text
    assert val[0].text.startswith("line 90")
    assert split_documents(_docs(4), 0.0)[1] == []
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(_docs(4), 1.0)
    with pytest.raises(DataError, match="too short"):
        split_documents([Document("f", "a", "x")], 0.5)


def test_read_inputs_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(
        b"\xef\xbb\xbffirst doc\r\nline two  \n" + EOT.encode() + b"\nsecond doc\n"
    )
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two", "id": 3}) + "\n"
    )
    (tmp_path / "c.txt").write_bytes("caf\xe9 latin-1".encode("cp1252"))
    docs = read_inputs([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.txt"])
    assert [(d.key, d.text) for d in docs] == [
        ("a.txt/1", "first doc\nline two"),
        ("a.txt/2", "second doc"),
        ("b.jsonl/1", "json one"),
        ("b.jsonl/3", "json two"),
        ("c.txt/all", "caf\xe9 latin-1"),
    ]


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "hold no text"),
        ("  \n\n", "hold no text"),
        ('{"text": 1}\n', 'no string field "text"'),
        ("not json\n", "not valid JSON"),
    ],
)
def test_read_inputs_errors(tmp_path, content, match):
    p = tmp_path / ("x.jsonl" if "{" in content or "json" in content else "x.txt")
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        read_inputs([p])


def test_missing_input_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.txt not found"):
        read_inputs([tmp_path / "nope.txt"])


def test_clean_text_is_canonical():
    assert clean_text("\ufeffe\u0301 a  \r\nb\r\n\n") == "\u00e9 a\nb"
