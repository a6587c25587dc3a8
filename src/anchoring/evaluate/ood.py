"""Out-of-distribution detection with per-passage surprisal and s₂ (the `lm-ood` experiment).

A model trained on Shakespeare should find held-out Shakespeare unsurprising and other text
surprising. The comparison sets range from plainly foreign to subtly broken:

* `milton` — another author, same era and language (a style shift);
* `shuffled` — held-out Shakespeare with the words of each line shuffled (right words, wrong order);
* `random` — random characters from the training vocabulary, same lengths (noise);
* `suffix` — held-out Shakespeare with 20–40 characters of random tokens appended (a local break
  that a passage mean dilutes).

The derived sets (`shuffled`, `random`, `suffix`) are made from the same held-out passages as the
reference, so lengths and content match and only the perturbation differs. Every builder takes
texts and a seed and returns texts; nothing here needs a model except `score_sets`.

Each passage is reduced to its mean s₂ and its mean surprisal; AUROC (reference = negative class,
comparison set = positive class, higher score = more out of distribution) says how well either
number separates the two. 0.5 is chance; below 0.5 means the comparison set looks *less* surprising.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from anchoring.errors import AnchoringError  # noqa: E402
from anchoring.evaluate.surprise import LanguageModel, SpanTokenizer, passage_mean_scores  # noqa: E402

REFERENCE = "shakespeare"
SETS = (REFERENCE, "milton", "shuffled", "random", "suffix")
METRICS = ("s2", "surprisal")
UNKNOWN = "\ufffd"


def _rng(seed: int, salt: str) -> random.Random:
    """One generator per builder, so adding a set never changes another set's draws."""
    return random.Random(f"{seed}:{salt}")


def crop(text: str, max_chars: int, min_chars: int = 1) -> str:
    """At most `max_chars`: cut after the last line end that keeps ≥ `min_chars`, else a hard cut at `max_chars`."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", max(min_chars - 1, 0), max_chars)
    return text[:cut + 1] if cut >= 0 else text[:max_chars]


def long_enough(texts: Sequence[str], min_chars: int) -> list[str]:
    """The passages a set may draw from: at least `min_chars` characters besides surrounding blanks."""
    return [t for t in texts if len(t.strip()) >= min_chars]


def select_passages(texts: Sequence[str], n: int, seed: int, *, min_chars: int = 200, max_chars: int = 600) -> list[str]:
    """A seeded sample of `n` passages with at least `min_chars` characters, cropped to `max_chars`.

    Short speeches ("Ay, my lord.") carry too few tokens for a stable mean, so they are left out.
    """
    if not 0 < min_chars <= max_chars:
        raise AnchoringError(f"passage length range must satisfy 0 < min_chars ≤ max_chars, got {min_chars}…{max_chars}")
    pool = long_enough(texts, min_chars)
    if len(pool) < n:
        raise AnchoringError(f"only {len(pool)} passages have ≥ {min_chars} characters; asked for {n}")
    picked = _rng(seed, "select").sample(pool, n)
    return [crop(t, max_chars, min_chars) for t in picked]


_WORDS = re.compile(r"\S+")


def shuffle_words(texts: Sequence[str], seed: int) -> list[str]:
    """Shuffle the words within each line; leading indentation, line breaks and the words themselves are kept."""
    rng = _rng(seed, "shuffle")
    out = []
    for t in texts:
        lines = []
        for line in t.split("\n"):
            words = _WORDS.findall(line)
            rng.shuffle(words)
            indent = line[:len(line) - len(line.lstrip())]
            lines.append(indent + " ".join(words) if words else line)
        out.append("\n".join(lines))
    return out


def random_characters(texts: Sequence[str], vocabulary: str, seed: int) -> list[str]:
    """Uniformly random characters from `vocabulary` (the training characters), one text per input, same lengths."""
    chars = sorted(set(vocabulary) - {UNKNOWN})
    if not chars:
        raise AnchoringError("the vocabulary for random characters is empty")
    rng = _rng(seed, "random")
    return ["".join(rng.choices(chars, k=len(t))) for t in texts]


def random_token_text(tokenizer: SpanTokenizer, length: int, rng: random.Random) -> str:
    """`length` characters made of uniformly drawn token ids, decoded one by one.

    Ids that decode to nothing or to U+FFFD (the unknown id, a lone byte of a multi-byte character)
    are drawn again, so the text holds only real pieces of the vocabulary; the last piece is cut to fit.
    """
    out, size, tries = [], 0, 0
    while size < length:
        tries += 1
        if tries > 100 * length + 1000:
            raise AnchoringError("the tokenizer decodes almost no single token to text; cannot draw random tokens")
        piece = tokenizer.decode([rng.randrange(tokenizer.vocab_size)])
        if not piece or UNKNOWN in piece:
            continue
        out.append(piece)
        size += len(piece)
    return "".join(out)[:length]


def inject_suffix(texts: Sequence[str], tokenizer: SpanTokenizer, seed: int, lo: int = 20, hi: int = 40) -> list[str]:
    """Append `lo`…`hi` characters (uniform, inclusive) of random tokens to each text."""
    if not 0 < lo <= hi:
        raise AnchoringError(f"suffix length range must satisfy 0 < lo ≤ hi, got {lo}…{hi}")
    rng = _rng(seed, "suffix")
    return [t + random_token_text(tokenizer, rng.randint(lo, hi), rng) for t in texts]


def written_in(texts: Sequence[str], vocabulary: str) -> list[str]:
    """The texts made only of `vocabulary`'s characters (and spaces and line ends).

    Why: a character the model never trained on is scored as the unknown token, which any model finds
    surprising; a set that differs by its editors' markup (Milton's notes carry `~`, `+`, `=`) would
    measure that, not its style."""
    known = set(vocabulary) | {" ", "\n"}
    return [t for t in texts if set(t) <= known]


def comparison_sets(heldout: Sequence[str], milton: Sequence[str] | None, tokenizer: SpanTokenizer, vocabulary: str, *,
                    n: int = 200, seed: int = 0, min_chars: int = 200, max_chars: int = 600) -> dict[str, list[str]]:
    """The five sets of the experiment, `n` passages each, from held-out Shakespeare and Milton texts;
    `vocabulary` is the training text's characters (random characters are drawn from it, and Milton
    passages with any other character are left out). `milton=None` (a model that did not learn
    Shakespeare, for which Milton is no other domain): the four other sets only."""
    base = select_passages(heldout, n, seed, min_chars=min_chars, max_chars=max_chars)
    sets = {REFERENCE: base}
    if milton is not None:
        sets["milton"] = select_passages(written_in(milton, vocabulary), n, seed, min_chars=min_chars, max_chars=max_chars)
    sets.update(shuffled=shuffle_words(base, seed), random=random_characters(base, vocabulary, seed),
                suffix=inject_suffix(base, tokenizer, seed))
    return sets


def lm_ood_sets(tokenizer: SpanTokenizer, vocabulary: str, *, n: int = 200, seed: int = 0, split_seed: int = 0,
                fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), cache: bool = True,
                min_chars: int = 200) -> dict[str, list[str]]:
    """The sets from the built-in corpora: Shakespeare's *test* part (the LM never trained on it) and Milton.

    `split_seed` and `fractions` must be the run's, so that "held out" means held out from that model.
    Stage-direction-only passages are left out of the reference.
    """
    from anchoring.domains.text.corpus import load_corpus
    from anchoring.domains.text.split import split_indices

    shakespeare = load_corpus("shakespeare", cache)
    test = split_indices(shakespeare.ids(), fractions, split_seed)["test"]
    heldout = [shakespeare.texts[i] for i in test if not shakespeare.is_stage_only(int(i))]
    return comparison_sets(heldout, load_corpus("milton", cache).texts, tokenizer, vocabulary, n=n, seed=seed,
                           min_chars=min_chars)


def score_sets(model: LanguageModel, tokenizer: SpanTokenizer, sets: dict[str, Sequence[str]], *, context: int,
               stride: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per set, per metric (`s2`, `surprisal`, `entropy`): one passage mean per text."""
    out = {}
    for name, texts in sets.items():
        means = passage_mean_scores(model, tokenizer, texts, context=context, stride=stride)
        out[name] = {k: v.numpy() for k, v in means.items()}
    return out


def _pair(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference, other = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    reference, other = reference[~np.isnan(reference)], other[~np.isnan(other)]
    if not len(reference) or not len(other):
        raise AnchoringError("AUROC needs at least one scored passage in each set")
    y = np.r_[np.zeros(len(reference)), np.ones(len(other))]
    s = np.r_[reference, other]
    finite = s[np.isfinite(s)]
    if len(finite) < len(s):  # an infinite mean (a masked logit) ranks above or below every finite one, and
        # AUROC is a statistic of ranks alone: give infinities the next value past the finite ones, which
        # sklearn accepts, keeping every order and tie
        hi, lo = (finite.max(), finite.min()) if len(finite) else (0.0, 0.0)
        s = np.where(s == np.inf, hi + 1.0, np.where(s == -np.inf, lo - 1.0, s))
    return y, s


def auroc(reference: np.ndarray, other: np.ndarray) -> float:
    """P(score of a random `other` passage > score of a random reference passage), ties counting half."""
    y, s = _pair(reference, other)
    return float(roc_auc_score(y, s))


def auroc_table(scores: dict[str, dict[str, np.ndarray]], reference: str = REFERENCE,
                metrics: Sequence[str] = METRICS) -> dict[str, dict[str, float]]:
    """{set: {metric: AUROC against the reference}} for every set but the reference."""
    ref = scores[reference]
    return {name: {m: auroc(ref[m], sc[m]) for m in metrics} for name, sc in scores.items() if name != reference}


def roc_curves(scores: dict[str, dict[str, np.ndarray]], metric: str, reference: str = REFERENCE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{set: (false-positive rate, true-positive rate)} for one metric."""
    out = {}
    for name, sc in scores.items():
        if name == reference:
            continue
        y, s = _pair(scores[reference][metric], sc[metric])
        fpr, tpr, _ = roc_curve(y, s)
        out[name] = (fpr, tpr)
    return out


LABELS = {"s2": "passage-mean s₂", "surprisal": "passage-mean surprisal", "entropy": "passage-mean entropy"}


def roc_figure(scores: dict[str, dict[str, np.ndarray]], reference: str = REFERENCE, metrics: Sequence[str] = METRICS,
               title: str = "Held-out Shakespeare against each comparison set", reference_label: str | None = None) -> Figure:
    """One panel per metric, one ROC curve per comparison set, AUROC in the legend; the false-positive
    axis is named after the held-out text (`reference_label`, by default the reference set's key)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0), squeeze=False)
    table = auroc_table(scores, reference, metrics)
    for ax, metric in zip(axes[0], metrics):
        for name, (fpr, tpr) in roc_curves(scores, metric, reference).items():
            ax.plot(fpr, tpr, lw=1.6, label=f"{name}  {table[name][metric]:.3f}")
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel(f"false-positive rate (held-out {reference_label or reference})")
        ax.set_ylabel("true-positive rate")
        ax.set_title(LABELS.get(metric, metric), fontsize=10)
        ax.legend(title="set  AUROC", fontsize=8, title_fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
