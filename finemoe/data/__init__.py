"""Training text: the public-domain corpus built from registry packages, user text files, tokenizers,
and token files with deterministic batches.

    from finemoe.data.prepare import prepare          # build or reuse a data folder -> Path
    from finemoe.data.tokenizer import load_tokenizer  # .encode / .decode / .vocab_size / .eot_id
    from finemoe.data.tokens import TokenFile          # TokenFile(folder / "train.bin").batch(step, ...)

Modules: fetch (pinned downloads, cache, archives), rdata and sword (the two binary text formats),
sources (which package holds which text), corpus (documents, user files, the split), tokenizer,
prepare (the pipeline and the folder layout), tokens (token files and batches).
"""
