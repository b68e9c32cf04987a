"""Sampling text from a trained model, so a user can see what it learned.

Decoding runs through a KV cache (finemoe.nn.model.KVCache): the prompts are prefilled together,
left-padded to one length with their padding masked out and their positions counted from each one's
first token, and then each step feeds only the new tokens. A prompt's tokens are those it gets alone:
its logits do not depend on its batch-mates (up to float rounding), and each prompt samples from its
own generator, seeded `seed + its index`. Past the model's seq_len the context is the last seq_len
tokens, as in training: the cache is then refilled from that window at every step, which costs what
decoding without a cache costs, but gives the same tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.nn.model import KVCache, Transformer
from finemoe.nn.moe import MoE
from finemoe.train import checkpoint


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, dict]:
    """A model from a run folder or its ckpt.pt; also returns the training config dict."""
    ckpt = checkpoint.load(path)
    cfg = ckpt["config"]
    model = Transformer(ModelConfig.from_dict(cfg["model"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def training_config(path: str | Path) -> dict | None:
    """The training config beside a model: a run folder's config.json (or the one above a model
    folder), else a checkpoint's own; None for a bare model folder."""
    import json

    path = Path(path)
    for f in (path / "config.json", path.parent / "config.json"):
        if f.is_file():  # a model folder's own config.json is a ModelConfig, without data_dir
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "data_dir" in data:
                return data
    if path.is_file() or (path / "ckpt.pt").is_file():
        return checkpoint.load(path)["config"]
    return None


def find_tokenizer(path: str | Path, train_cfg: dict | None, explicit: str | None = None) -> Path:
    """The tokenizer a run used: --tokenizer, else the copy in the run folder (or in the folder above a
    model folder), else the run's data_dir's."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    candidates = (
        [Path(explicit)] if explicit else [run_dir / "tokenizer.json", run_dir.parent / "tokenizer.json"]
    )
    if not explicit and train_cfg:
        candidates.append(Path(train_cfg["data_dir"]) / "tokenizer.json")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"no tokenizer.json found (looked at {', '.join(map(str, candidates))}); pass --tokenizer PATH"
    )


EOT = "<|endoftext|>"


def _is_int(x, lo: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _in_range(x, lo: float, hi: float, lo_open: bool) -> bool:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return False
    return (v > lo if lo_open else v >= lo) and v <= hi


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int
) -> None:
    """Reject settings that would fail deep in torch or silently mean something else."""
    if not _is_int(max_new_tokens, 0):
        raise ConfigError(f"max_new_tokens={max_new_tokens!r}: need an integer >= 0")
    if not _in_range(temperature, 0, float("inf"), False) or float(temperature) == float("inf"):
        raise ConfigError(f"temperature={temperature!r}: need a finite number >= 0 (0 = greedy)")
    if top_k is not None and not _is_int(top_k, 1):
        raise ConfigError(f"top_k={top_k!r}: need an integer >= 1")
    if top_p is not None and not _in_range(top_p, 0, 1, True):
        raise ConfigError(f"top_p={top_p!r}: need a number in (0, 1]")
    if not _is_int(seed, 0) or seed >= 2**63:
        raise ConfigError(f"seed={seed!r}: need an integer in [0, 2**63)")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits [B, V] with every token outside the top k, or outside the nucleus (the fewest likeliest
    tokens holding top_p of the probability), at -inf; the likeliest token always stays."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before it already hold top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def pick_next(
    logits: torch.Tensor,
    gens: Sequence[torch.Generator],
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The next token [B] of each row of fp32 logits [B, V]: argmax at temperature 0, else a draw from
    the filtered softmax with that row's generator (so a row's draw does not depend on the others)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Generation routes and normalises as inference does; the model's mode comes back after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def routes_per_token(model: torch.nn.Module) -> bool:
    """Whether (in eval mode) every MoE layer routes each token on its own: Token Choice, or Expert Choice
    with calibrated thresholds. An uncalibrated Expert Choice layer routes groups across the batch."""
    return all(m.cfg.routing != "ec" or m.thresholds_route for m in model.modules() if isinstance(m, MoE))


def _prefill(model: Transformer, windows: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    """A new cache holding `windows` left-padded to one length; the fp32 logits [B, V] after each."""
    device = next(model.parameters()).device
    width = max(map(len, windows))
    pad = torch.tensor([width - len(w) for w in windows], device=device)
    idx = torch.tensor([[0] * (width - len(w)) + w for w in windows], dtype=torch.long, device=device)
    cache = model.new_cache(len(windows), pad)
    return cache, model(idx, cache=cache).logits[:, -1, :].float()


Pick = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]


def _decode_cached(
    model: Transformer, prompts: list[list[int]], gens: list, n: int, pick: Pick, eos_id: int | None
) -> list[list[int]]:
    """The new tokens of each prompt, decoded together through one KV cache; a row that emits eos_id
    leaves the batch (and its cache rows go)."""
    seq_len = model.cfg.seq_len
    ctx = [list(p) for p in prompts]
    active = list(range(len(prompts)))
    cache, last = None, None
    for _ in range(n):
        if cache is None or cache.length >= seq_len:  # start, or full: refill from the last seq_len
            cache, logits = _prefill(model, [ctx[r][-seq_len:] for r in active])
        else:
            logits = model(last[:, None], cache=cache).logits[:, -1, :].float()
        last = pick(logits, [gens[r] for r in active])
        toks = last.tolist()
        for r, t in zip(active, toks):
            ctx[r].append(t)
        if eos_id is not None and eos_id in toks:
            keep = [j for j, t in enumerate(toks) if t != eos_id]
            active = [active[j] for j in keep]
            if not active:
                break
            rows = torch.tensor(keep, device=last.device)
            cache.keep(rows)
            last = last.index_select(0, rows)
    return [c[len(p) :] for c, p in zip(ctx, prompts)]


def _decode_uncached(
    model: Transformer, prompts: list[list[int]], gens: list, n: int, pick: Pick, eos_id: int | None
) -> list[list[int]]:
    """The reference decoding: each prompt alone, the whole (last seq_len) context every step."""
    device = next(model.parameters()).device
    out = []
    for p, g in zip(prompts, gens):
        ctx = list(p)
        for _ in range(n):
            idx = torch.tensor([ctx[-model.cfg.seq_len :]], dtype=torch.long, device=device)
            ctx.append(int(pick(model(idx).logits[:, -1, :].float(), [g])[0]))
            if ctx[-1] == eos_id:
                break
        out.append(ctx[len(p) :])
    return out


@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new token ids of each prompt (token ids), in eval mode: up to max_new_tokens, fewer when the
    prompt's continuation reaches eos_id (kept as its last token). Temperature 0 is greedy; top_k
    and top_p (nucleus) filter what is sampled from; prompt i samples with seed + i.

    An Expert Choice model without calibrated thresholds routes tokens in groups across the batch,
    so a prompt's tokens would depend on its batch-mates and on how many new tokens each step feeds;
    such a model decodes each prompt alone (a batch of one), where every token is routed on its own
    (finemoe.nn.moe's small-group rule), the same tokens whatever the batch. Calibrate it
    (finemoe.nn.moe.calibrate) to decode batches together. `use_cache=False` is the slow reference: each
    prompt alone, the whole context every step."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} has no tokens; give a non-empty prompt")
        if min(p) < 0 or max(p) >= model.cfg.vocab_size:
            raise ConfigError(
                f"prompt {i} holds token ids outside the model's vocab of {model.cfg.vocab_size}"
            )
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(prompts))]
    pick = partial(pick_next, temperature=temperature, top_k=top_k, top_p=top_p)
    with _eval_mode(model):
        if not use_cache:
            return _decode_uncached(model, prompts, gens, max_new_tokens, pick, eos_id)
        if routes_per_token(model):
            return _decode_cached(model, prompts, gens, max_new_tokens, pick, eos_id)
        return [
            _decode_cached(model, [p], [g], max_new_tokens, pick, eos_id)[0] for p, g in zip(prompts, gens)
        ]


def sample(
    model: Transformer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    top_p: float | None = None,
) -> list[int]:
    """One prompt and its continuation (see generate_ids). The context is cropped to the model's seq_len."""
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give a non-empty --prompt")
    return list(ids) + generate_ids(model, [ids], max_new_tokens, temperature, top_k, top_p, seed)[0]


def load_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` from one, from finemoe's wrapper of one, or from a tokenizer.json path."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(getattr(tokenizer, "hf", None), Tokenizer):
        return tokenizer.hf
    try:
        return Tokenizer.from_file(str(tokenizer))
    except Exception as e:
        raise ConfigError(f"cannot load tokenizer {tokenizer}: {e}") from None


def generate_text(
    model: Transformer,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[dict]:
    """Continue each text prompt (see generate_ids); per prompt a dict: prompt, text (prompt and
    continuation), completion, tokens (the prompt's and the new ids) and stop ("eos" or "length").
    Decoding stops at the tokenizer's <|endoftext|> when it has one and stop_at_eos is set."""
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model only {model.cfg.vocab_size}; "
            "pass the run's tokenizer"
        )
    ids = [encode_prompt(tok, p, i) for i, p in enumerate(prompts)]
    eos = tok.token_to_id(EOT) if stop_at_eos else None
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos)
    return [
        {
            "prompt": p,
            "text": tok.decode(i + n),
            "completion": tok.decode(n),
            "tokens": i + n,
            "stop": "eos" if eos is not None and n and n[-1] == eos else "length",
        }
        for p, i, n in zip(prompts, ids, new)
    ]


def encode_prompt(tok, prompt: str, i: int = 0) -> list[int]:
    """A prompt's ids; an empty prompt, or one the tokenizer drops entirely, is an error."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt {i} is a {type(prompt).__name__}, not text")
    ids = tok.encode(prompt).ids
    if not prompt or not ids:
        raise ConfigError(f"prompt {i} ({prompt!r}) encodes to no tokens; give a non-empty prompt")
    return ids
