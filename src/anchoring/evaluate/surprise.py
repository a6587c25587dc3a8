"""Per-token surprisal, entropy and their normalised gap s₂, for any causal language model.

For a text x₁…x_T and a model giving p(· | x_<t):

* surprisal  iₜ = −log p(xₜ | x_<t)           (nats; how unexpected the token that came was)
* entropy    hₜ = −Σ_v p(v | x_<t) log p(v | x_<t)   (nats; how unsure the model was before seeing it)
* s₂ₜ = (iₜ − hₜ) / log|V|

`s₂` is the surprisal *beyond what the model itself expected*: it is zero on average when the text
comes from the model's own distribution, large and positive for a confident mistake, slightly
negative for a confident correct guess. Dividing by log|V| (the surprisal of a uniform guess) puts
models with different vocabularies on one scale.

Alignment: every score array has one entry per token, **position 0 is NaN** (nothing predicts the
first token). Keeping the arrays as long as the token list lets callers zip them with spans.

Texts longer than the model's context are scored with overlapping windows (see `windows`).
Everything here is generic: a model is anything mapping token ids `(B, T)` to logits `(B, T, V)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch

from anchoring.errors import AnchoringError

LanguageModel = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) → next-token logits (B, T, V)


class SpanTokenizer(Protocol):
    """What scoring and the page need from a tokenizer (CharTokenizer and BPETokenizer both fit)."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spans(self, text: str) -> list[tuple[int, int]]: ...


@dataclass
class TokenScores:
    """Scores per token (float32 CPU tensors of length T, NaN at position 0) and log|V| used for s₂."""

    surprisal: torch.Tensor
    entropy: torch.Tensor
    s2: torch.Tensor
    log_vocab: float

    def __len__(self) -> int:
        return len(self.surprisal)

    def mean(self, start: int = 0, stop: int | None = None) -> dict[str, float]:
        """Means over tokens [start, stop) that have a score (NaN where none has): the passage mean."""
        sl = slice(start, stop)
        return {name: _nanmean(getattr(self, name)[sl]) for name in ("surprisal", "entropy", "s2")}


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].double().mean()) if bool(ok.any()) else math.nan


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surprisal, entropy, s₂) for logits `(..., V)` that predict `targets` `(...)`.

    Pure and shape-preserving: the caller decides which logits predict which token (for a causal LM,
    `logits[:, :-1]` predict `ids[:, 1:]`). Computed in float32 at least, so bf16 logits are fine.
    Vocabulary entries with logit −inf (masked) contribute 0 to the entropy, not NaN.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    logp = torch.log_softmax(logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)
    surprisal = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    s2 = (surprisal - entropy) / math.log(logits.shape[-1])
    return surprisal, entropy, s2


def windows(length: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows `(start, first, stop)` to score a sequence longer than the context.

    Each window is the `context` tokens `[start, start + context)` (shorter only when the whole
    text fits) and scores positions `[first, stop)`. The first window scores positions 1…context−1
    with all the context they have; each later window advances by at most `stride` tokens and
    scores only its new tail, so every position is scored exactly once and sees at least
    `context − stride` tokens of left context (default stride = context // 2). The last window is
    aligned to the end of the text.
    """
    if context < 2:
        raise AnchoringError(f"context must be at least 2 tokens, got {context}")
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context - 1:
        raise AnchoringError(f"stride must be between 1 and context−1 ({context - 1}), got {stride}")
    if length < 2:
        return []
    if length <= context:
        return [(0, 1, length)]
    out = [(0, 1, context)]
    done = context
    while done < length:
        stop = min(done + stride, length)
        out.append((stop - context, done, stop))
        done = stop
    return out


def _device(model: LanguageModel) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def score_ids(model: LanguageModel, ids: Sequence[int] | torch.Tensor, *, context: int, stride: int | None = None,
              batch: int | None = None) -> TokenScores:
    """Score one token sequence (any length) with a causal LM; windows are batched `batch` at a time.

    Default batch: 4 windows on CPU (measured fastest for the default LM on one core: larger batches
    fall out of cache), 64 on an accelerator.

    A module in training mode is switched to eval for the call and back afterwards, so dropout
    does not add noise to the scores.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
    T = len(ids)
    spans = windows(T, context, stride)
    surprisal = torch.full((T,), math.nan)
    entropy = torch.full((T,), math.nan)
    s2 = torch.full((T,), math.nan)
    log_vocab = math.nan
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    device = _device(model)
    if batch is None:
        batch = 4 if device.type == "cpu" else 64
    try:
        with torch.inference_mode():
            if T == 1:  # nothing to score, but the page still needs log|V|
                log_vocab = math.log(model(ids[None].to(device)).shape[-1])
            for b in range(0, len(spans), batch):
                group = spans[b:b + batch]
                width = min(context, T)
                x = torch.stack([ids[a:a + width] for a, _, _ in group]).to(device)
                logits = model(x)
                if logits.dim() != 3 or logits.shape[:2] != x.shape:
                    raise AnchoringError(f"model gave logits of shape {tuple(logits.shape)} for ids {tuple(x.shape)}; expected (B, T, V)")
                # position q is predicted by the logits at q − 1 of its window
                rows = torch.cat([logits[k, first - 1 - a:stop - 1 - a] for k, (a, first, stop) in enumerate(group)])
                pos = torch.cat([torch.arange(first, stop) for _, first, stop in group])
                i, h, s = token_scores(rows, ids[pos].to(device))
                surprisal[pos], entropy[pos], s2[pos] = i.float().cpu(), h.float().cpu(), s.float().cpu()
                log_vocab = math.log(logits.shape[-1])
    finally:
        if was_training:
            model.train()
    return TokenScores(surprisal, entropy, s2, log_vocab)


def score_text(model: LanguageModel, tokenizer: SpanTokenizer, text: str, *, context: int, stride: int | None = None,
               batch: int | None = None) -> tuple[list[tuple[int, int]], TokenScores]:
    """Tokenise `text` and score it: character spans per token and their scores (aligned 1:1)."""
    ids = tokenizer.encode(text)
    spans = [tuple(s) for s in tokenizer.spans(text)]
    if len(spans) != len(ids):
        raise AnchoringError(f"tokenizer gave {len(ids)} ids but {len(spans)} spans for the same text")
    scores = score_ids(model, ids, context=context, stride=stride, batch=batch)
    if math.isnan(scores.log_vocab):
        scores.log_vocab = math.log(tokenizer.vocab_size)
    return spans, scores


def passage_means(scores: TokenScores, spans: Sequence[tuple[int, int]], passages: Sequence[tuple[int, int]]) -> list[dict[str, float]]:
    """Mean scores per passage (character ranges); a token belongs to the passage its first character is in."""
    starts = torch.tensor([s for s, _ in spans], dtype=torch.long)
    out = []
    for a, b in passages:
        keep = (starts >= a) & (starts < b)
        out.append({name: _nanmean(getattr(scores, name)[keep]) for name in ("surprisal", "entropy", "s2")})
    return out


def passage_mean_scores(model: LanguageModel, tokenizer: SpanTokenizer, texts: Sequence[str], *, context: int,
                        stride: int | None = None) -> dict[str, torch.Tensor]:
    """Passage-mean surprisal (nats), entropy (nats) and s₂ for each text scored on its own."""
    out: dict[str, list[float]] = {"surprisal": [], "entropy": [], "s2": []}
    for t in texts:
        _, sc = score_text(model, tokenizer, t, context=context, stride=stride)
        for k, v in sc.mean().items():
            out[k].append(v)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
