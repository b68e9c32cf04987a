"""`finemoe export --hf`: a dense model loads as a plain GPT-2, an MoE with its own modeling code; both
give finemoe's eval-mode logits, and an MoE's do not depend on the batch."""

import json

import pytest
import torch
from _train_fixtures import cli

from finemoe.config import ModelConfig
from finemoe.export.hf import export_hf
from finemoe.nn.model import Transformer, save_pretrained
from finemoe.nn.moe import calibrate

transformers = pytest.importorskip("transformers")  # a third-party extra: `pip install finemoe[export]`

BASE = {"vocab_size": 96, "seq_len": 24, "d_model": 32, "head_dim": 16, "n_blocks": 2}


def _saved(tmp_path, **model) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**{**BASE, **model}))
    if m.cfg.ffn == "moe" and m.cfg.routing == "ec":
        calibrate(m, [torch.randint(0, 96, (16, 24)) for _ in range(4)])
    save_pretrained(m, tmp_path / "run" / "model")
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    return m.eval()


def _hf(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def test_dense_exports_as_gpt2_with_the_same_logits(tmp_path):
    m = _saved(tmp_path, ffn="dense", activation="gelu")
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    assert out["format"] == "gpt2" and "tokenizer.json" in out["files"]
    hf = _hf(tmp_path / "hf")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = torch.randint(0, 96, (3, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("routing", ["ec", "tc"])
def test_moe_exports_with_its_code_and_the_same_logits(tmp_path, routing):
    m = _saved(tmp_path, ffn="moe", expansion_rate=2, granularity=4, routing=routing, pos_emb="rope")
    assert export_hf(tmp_path / "run", tmp_path / "hf")["format"] == "finemoe"
    hf = _hf(tmp_path / "hf", trust_remote_code=True)
    x = torch.randint(0, 96, (4, 24))
    with torch.no_grad():
        logits = hf(x).logits
        torch.testing.assert_close(logits, m(x).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(x[1:2]).logits, logits[1:2], rtol=0, atol=1e-5)  # alone = in a batch
        more = hf.generate(x[:1, :8], max_new_tokens=4, do_sample=False)
    assert more.shape == (1, 12) and torch.equal(more[:, :8], x[:1, :8])


def test_cli_export_and_its_refusals(tmp_path):
    _saved(tmp_path, ffn="moe", expansion_rate=2, granularity=2)
    r = cli("export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "finemoe"
    for args, why in [
        ((str(tmp_path / "nothing"), "--hf", str(tmp_path / "x")), "holds no finished model"),
        ((str(tmp_path / "run"), "--hf", str(tmp_path / "hf")), "not an empty folder"),
    ]:
        r = cli("export", *args)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # Expert Choice without inference thresholds: refused before anything is written
    torch.manual_seed(0)
    raw = Transformer(ModelConfig(**BASE, ffn="moe", expansion_rate=2, granularity=2))
    save_pretrained(raw, tmp_path / "raw")
    r = cli("export", str(tmp_path / "raw"), "--hf", str(tmp_path / "hf2"))
    assert r.returncode == 2 and "calibrate" in r.stderr and not (tmp_path / "hf2").exists()
