"""Measuring an LM: loss in nats per character on validation text, split into concept positions and
retain passages; alignment with the anchor per layer; linear probes for the concept.

**Which positions count.** Validation passages are scored whole, in corpus order (or one fixed
shuffle of it, `evaluate.order = "shuffled"`), packed like the
training stream (windows of `window+1` tokens at stride `window`), so every token is predicted once,
with the text before it in its window as context (the context starts afresh at each window, as in
training). A token's characters are its tokenizer span.

- *concept*: a token of a reference-positive passage that overlaps a word where `concept_spans`
  fired or one of the `after` (20) characters that follow it — the word and the text it colours;
- *retain*: every token of a reference-negative passage;
- the rest (the other tokens of positive passages) counts only in *all*.

Loss is Σ nats / Σ characters of the *predicted* tokens (a target's class decides where its nats
go); for char tokens that is nats per token. Alignment and probes read the residual state *at* a
token (its input position), classed the same way. Alignment is cos(h, anchor) — for a subspace
concept (dims, no axis) the share of h's norm inside the subspace, ‖P h‖/‖h‖. margin = mean at
concept − mean at retain; containment = mean at retain (as in M3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from anchoring.anchor import Capture
from anchoring.kinds.lm.data import SEPARATOR, LMData, token_mask

CONCEPT, RETAIN, OTHER, PAD = 1, 2, 0, -1
LN2 = float(np.log(2.0))


@dataclass
class EvalSet:
    tokens: torch.Tensor  # (N, T+1)
    passage: torch.Tensor  # (N, T+1) corpus passage index, −1 on padding
    chars: torch.Tensor  # (N, T+1) characters per token
    cls: torch.Tensor  # (N, T+1) CONCEPT | RETAIN | OTHER | PAD
    passages: list[int]


def chars_per_token(spans: list[tuple[int, int]]) -> np.ndarray:
    """Characters each token completes, so nats/char divides by the text's length: a multi-byte
    character cut across byte tokens lies in the span of each of them, and counts once, on the last.
    Why the last: a score that leaves out the first token (nothing predicts it) then leaves out no
    character whose later bytes it still scores."""
    chars = np.zeros(len(spans), dtype=np.float32)
    limit = max((e for _, e in spans), default=0)  # characters from here on are counted (by later tokens)
    for i in range(len(spans) - 1, -1, -1):
        s, e = spans[i]
        chars[i] = max(0, min(e, limit) - s)
        limit = min(limit, s)
    return chars


def token_table(data: LMData, text: str, positive: bool, concept: str, after: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, characters per token and class per token of one passage (with its separator)."""
    full = text + SEPARATOR
    ids = data.encode(full)
    spans = data.tokenizer.spans(full)
    chars = chars_per_token(spans)
    if not positive:
        return ids, chars, np.full(len(ids), RETAIN, dtype=np.int8)
    cls = np.where(token_mask(full, spans, concept, after), CONCEPT, OTHER).astype(np.int8)
    return ids, chars, cls


ORDER_SALT = 0xE7A1


def eval_passages(data: LMData, max_chars: int, part: str = "validation", order: str = "corpus") -> list[int]:
    """The passages an evaluation scores: whole passages of `part` until `max_chars` characters, in
    corpus order or (`order = "shuffled"`) in one fixed permutation of the split (the same for every
    seed and arm). Corpus order is contiguous text; a concept that sits in one region of the corpus
    (Milton after the plays) needs the shuffled order to appear at all."""
    idx = [int(i) for i in data.parts[part]]
    if order == "shuffled":
        idx = [idx[j] for j in np.random.default_rng([data.text.split_seed, ORDER_SALT]).permutation(len(idx))]
    used, total = [], 0
    for i in idx:
        if total >= max_chars:
            break
        used.append(i)
        total += len(data.texts[i])
    return used


def eval_set(data: LMData, window: int, max_chars: int, after: int, part: str = "validation", order: str = "corpus") -> EvalSet:
    concept = data.text.concept
    ids, chars, cls, pas = [], [], [], []
    used = eval_passages(data, max_chars, part, order)
    for i in used:
        t, c, k = token_table(data, data.texts[i], bool(data.reference[i]), concept, after)
        ids.append(t)
        chars.append(c)
        cls.append(k)
        pas.append(np.full(len(t), i))
    cat = [np.concatenate(a) for a in (ids, chars, cls, pas)]
    n = max(1, -(-(len(cat[0]) - 1) // window))
    L = n * window + 1
    pad = [np.zeros(L, np.int64), np.zeros(L, np.float32), np.full(L, PAD, np.int8), np.full(L, -1, np.int64)]
    for a, b in zip(pad, cat):
        a[:len(b)] = b[:L]
    idx = np.arange(n)[:, None] * window + np.arange(window + 1)[None, :]
    t, c, k, p = (torch.from_numpy(a[idx]) for a in pad)
    return EvalSet(t.long(), p.long(), c.float(), k.long(), used)


def direction_alignment(h: torch.Tensor, direction: torch.Tensor | None, dims: tuple[int, ...] | None) -> torch.Tensor:
    """cos(h, direction), or ‖h restricted to dims‖/‖h‖ for a subspace concept; `(…, D) → (…)`."""
    u = F.normalize(h.float(), dim=-1)
    if direction is not None:
        return u @ F.normalize(direction.float(), dim=0)
    return u[..., list(dims)].norm(dim=-1)


def remove(h: torch.Tensor, direction: torch.Tensor | None, dims: tuple[int, ...] | None) -> torch.Tensor:
    """h with the anchor direction (or subspace) projected out."""
    if direction is not None:
        v = F.normalize(direction.float(), dim=0)
        return h - (h @ v)[..., None] * v
    h = h.clone()
    h[..., list(dims)] = 0.0
    return h


@torch.no_grad()
def measure(model, es: EvalSet, sites: list[str], direction: torch.Tensor | None, dims: tuple[int, ...] | None,
            probe_positions: int, batch: int = 16, seed: int = 0) -> dict:
    """Loss by class, alignment by class per site, and probe features at sampled positions."""
    model.eval()
    nats = {c: 0.0 for c in ("all", "concept", "retain")}
    chars = {c: 0.0 for c in nats}
    align = {s: {"concept": [0.0, 0], "retain": [0.0, 0]} for s in sites}
    inp_cls = es.cls[:, :-1]
    rng = np.random.default_rng([seed, 7])
    pick = {}
    for name, c in (("concept", CONCEPT), ("retain", RETAIN)):
        where = torch.nonzero(inp_cls == c).numpy()
        if len(where) > probe_positions:
            where = where[np.sort(rng.choice(len(where), probe_positions, replace=False))]
        pick[name] = where
    feats = {s: {k: [] for k in pick} for s in sites}
    with Capture(model, sites) as cap:
        for b0 in range(0, len(es.tokens), batch):
            x = es.tokens[b0:b0 + batch]
            logits = model(x[:, :-1])
            ell = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(x.shape[0], -1)
            tc, ch = es.cls[b0:b0 + batch, 1:], es.chars[b0:b0 + batch, 1:]
            for name, mask in (("all", tc != PAD), ("concept", tc == CONCEPT), ("retain", tc == RETAIN)):
                nats[name] += float(ell[mask].sum())
                chars[name] += float(ch[mask].sum())
            ic = inp_cls[b0:b0 + batch]
            for s in sites:
                h = cap.acts[s]
                a = direction_alignment(h, direction, dims)
                for name, c in (("concept", CONCEPT), ("retain", RETAIN)):
                    m = ic == c
                    align[s][name][0] += float(a[m].sum())
                    align[s][name][1] += int(m.sum())
                for name, where in pick.items():
                    sel = where[(where[:, 0] >= b0) & (where[:, 0] < b0 + batch)]
                    if len(sel):
                        feats[s][name].append(h[sel[:, 0] - b0, sel[:, 1]].float())
    loss = {k: nats[k] / chars[k] if chars[k] else float("nan") for k in nats}
    out: dict = {"loss": loss, "bits": {k: v / LN2 for k, v in loss.items()}, "chars": chars, "alignment": {}}
    for s in sites:
        # no positions of a class: its mean is unknown (NaN), not 0, so no margin is made up
        c = align[s]["concept"][0] / align[s]["concept"][1] if align[s]["concept"][1] else float("nan")
        r = align[s]["retain"][0] / align[s]["retain"][1] if align[s]["retain"][1] else float("nan")
        out["alignment"][s] = {"concept": c, "retain": r, "margin": c - r, "containment": r,
                               "n_concept": align[s]["concept"][1], "n_retain": align[s]["retain"][1]}
    passage_of = {k: es.passage[:, :-1][pick[k][:, 0], pick[k][:, 1]].numpy() if len(pick[k]) else np.zeros(0, int)
                  for k in pick}
    out["features"] = {s: {k: torch.cat(v) if v else torch.zeros(0, 1) for k, v in feats[s].items()} for s in sites}
    out["feature_passages"] = passage_of
    return out


def probe_halves(y: np.ndarray, passage: np.ndarray) -> np.ndarray:
    """Which positions fit the probe (True) and which score it: positions of even-numbered passages fit
    it, odd-numbered ones score it, so no passage is on both sides. When that leaves a class on one side
    only (a few concept passages can share one parity: Milton's 7 held-out ones are all odd), each
    class's passages alternate instead, in corpus order, which puts both classes on both sides whenever
    each has two passages. The parity rule comes first so that every earlier split stays as it was."""
    if set(passage[y == 1]) & set(passage[y != 1]):  # the halves split passages, not positions
        raise ValueError("a passage holds positions of both classes: the halves would share it")
    train = passage % 2 == 0
    if len(set(y[train])) == 2 and len(set(y[~train])) == 2:
        return train
    for c in np.unique(y):
        m = y == c
        train[m] = np.searchsorted(np.unique(passage[m]), passage[m]) % 2 == 0
    return train


def probes(features: dict, passages: dict, direction: torch.Tensor | None, dims: tuple[int, ...] | None) -> list[dict]:
    """Per site: logistic-regression AUC for concept vs retain positions, with and without the anchor
    direction; fitted on the positions of one half of the passages and scored on the other (`probe_halves`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rows = []
    for site, f in features.items():
        if len(f["concept"]) < 10 or len(f["retain"]) < 10:
            rows.append({"site": site, "auc": float("nan"), "auc_without_anchor": float("nan")})
            continue
        X = torch.cat([f["concept"], f["retain"]])
        y = np.r_[np.ones(len(f["concept"])), np.zeros(len(f["retain"]))]
        train = probe_halves(y, np.r_[passages["concept"], passages["retain"]])
        row = {"site": site}
        for key, feats in (("auc", X), ("auc_without_anchor", remove(X, direction, dims))):
            Xn = F.normalize(feats, dim=-1).numpy()
            if len(set(y[train])) < 2 or len(set(y[~train])) < 2:
                row[key] = float("nan")
                continue
            clf = LogisticRegression(max_iter=300, C=1.0).fit(Xn[train], y[train])
            row[key] = float(roc_auc_score(y[~train], clf.decision_function(Xn[~train])))
        rows.append(row)
    return rows


@torch.no_grad()
def token_alignment(model, data: LMData, text: str, site: str, direction: torch.Tensor | None,
                    dims: tuple[int, ...] | None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Alignment of the residual state at every token of `text`, with spans. A text longer than the
    context is read in consecutive windows of `context` tokens, each from a fresh start (the summary
    reads validation text the same way, in windows of `lm.tokens`, which is the context unless
    `lm.window` is set)."""
    ids = np.asarray(data.encode(text), dtype=np.int64)
    spans = data.tokenizer.spans(text)
    parts = []
    with Capture(model, [site]) as cap:
        for a in range(0, len(ids), model.context):
            model(torch.from_numpy(ids[a:a + model.context])[None])
            parts.append(direction_alignment(cap.acts[site][0], direction, dims))
    return (torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)), spans
