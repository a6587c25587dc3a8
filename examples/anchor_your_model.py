"""Sparse concept anchoring on a model the toolkit has never seen: a character GRU language model.

Nothing here is specific to the toolkit's own models. The pieces used are the library's public ones:

* `anchoring.text.concept_spans` marks the words of a concept (here `violence`) in plain text;
* `anchoring.anchor.build_term` binds the anchor and anti-subspace regularizers to a site, which is
  just the dotted path of a submodule (`latent`);
* `anchoring.anchor.Capture` reads that site's output by a forward hook, in the same forward pass
  as the language-model loss;
* `anchoring.control.intervene` + `suppress` remove the concept at inference (a hook), and
  `anchoring.control.ablate` deletes the anchor axis from the weights for good.

Two arms train from the same initial weights on the same batches: `anchored` (the two terms on,
a sparse 30% of the violent passages labelled) and `control` (no terms). The script prints the
alignment margin at the latent (mean cos(z, axis) at concept positions minus at retain positions, the
positions of held-out passages where the labeller never fired) and
what deleting the axis does to the loss at concept positions and on retain passages, next to
deleting the control's post-hoc difference-of-means direction the same way. docs/own-model.md
walks through it; `python examples/anchor_your_model.py --help` lists the settings.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from anchoring.anchor import Capture, Concept, build_term
from anchoring.control import ablate, ablate_direction, intervene, suppress
from anchoring.control.erasure import mean_difference
from anchoring.errors import AnchoringError
from anchoring.text import concept_spans

SITE = "latent"  # the module whose output is anchored: any dotted path of any nn.Module


class CharGRU(nn.Module):
    """The user's model: embedding → GRU → a linear bottleneck `latent` → linear head."""

    def __init__(self, vocab: int, hidden: int = 128, latent: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 48)
        self.rnn = nn.GRU(48, hidden, batch_first=True)
        self.latent = nn.Linear(hidden, latent)
        self.head = nn.Linear(latent, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.latent(self.rnn(self.embed(tokens))[0]))


@dataclass
class Text:
    """One token stream: ids, a per-position concept mask (reference: every labeller hit), the
    sparse training labels (only the labelled passages' hits) and each position's passage."""

    ids: torch.Tensor
    concept: torch.Tensor
    labels: torch.Tensor
    passage: torch.Tensor


def encode(passages: list[str], vocab: dict[str, int], concept: str, labelled: set[int], after: int) -> Text:
    """Join passages with a blank line; mark each labeller hit and the `after` characters that follow it."""
    ids, ref, lab, which = [], [], [], []
    for i, text in enumerate(passages):
        mask = np.zeros(len(text) + 2, dtype=bool)
        for a, b in concept_spans(text, concept):
            mask[a:min(b + after, len(text))] = True  # the blank line after the passage is never the concept
        ids.extend(vocab.get(ch, 0) for ch in text + "\n\n")
        ref.extend(mask.tolist())
        lab.extend((mask if i in labelled else np.zeros_like(mask)).tolist())
        which.extend([i] * (len(text) + 2))
    return Text(torch.tensor(ids), torch.tensor(ref), torch.tensor(lab, dtype=torch.float32), torch.tensor(which))


def split(passages: list[str], concept: str, coverage: float, seed: int, after: int = 20) -> tuple[Text, Text, int]:
    """90/10 split by passage; a `coverage` share of the training passages with a hit get labels."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(passages))
    cut = int(0.9 * len(passages))
    train = [passages[i] for i in order[:cut]]
    held = [passages[i] for i in order[cut:]]
    chars = sorted(set("".join(train)) | {"\n"})  # the blank line between passages too
    vocab = {ch: i + 1 for i, ch in enumerate(chars)}  # 0: a character never seen in training
    positives = [i for i, t in enumerate(train) if concept_spans(t, concept)]
    labelled = set(rng.choice(positives, size=round(coverage * len(positives)), replace=False).tolist()) if positives else set()
    return encode(train, vocab, concept, labelled, after), encode(held, vocab, concept, set(), after), len(vocab) + 1


def batches(stream: Text, steps: int, batch: int, window: int, seed: int):
    """Random windows, drawn from their own generator: every arm of one seed sees the same batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(stream.ids) - window, (batch,), generator=g)  # window + 1 tokens each
        idx = start[:, None] + torch.arange(window + 1)
        yield stream.ids[idx], stream.labels[idx[:, :-1]]


def train(model: nn.Module, stream: Text, *, anchored: bool, steps: int, seed: int, axis: int = 0,
          anchor_weight: float = 1.0, anti_weight: float = 3.0, ramp_until: float = 0.5, batch: int = 32,
          window: int = 64, progress: str | None = None) -> list[float]:
    """Next-character loss, plus (anchored arm) the pull of labelled positions to the axis and the
    push of every other position out of it. Returns the language-model loss of every step (the
    terms left out, so the two arms' curves compare)."""
    width = model.get_submodule(SITE).out_features
    direction = [1.0 if i == axis else 0.0 for i in range(width)]
    concept = Concept("concept", labeller=None)  # labels come from the stream; the term needs the name
    terms = [build_term("anchor", "anchor", latent_dim=width, site=SITE, concept=concept, direction=direction),
             build_term("anti-subspace", "anti", latent_dim=width, site=SITE, concept=concept, select="unlabelled",
                        dims=[axis])] if anchored else []
    weights = {"anchor": anchor_weight, "anti": anti_weight}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    curve = []
    stream_of_batches = batches(stream, steps, batch, window, seed)
    if progress:  # a bar on the terminal, gone when the arm is done
        stream_of_batches = track(stream_of_batches, description=progress, total=steps, transient=True)
    with Capture(model, [SITE]) as cap:
        for step, (tokens, labels) in enumerate(stream_of_batches):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            lm_loss = loss.detach()
            if terms:
                # every position is a sample; the terms see unit vectors, so the push out of the axis is
                # on the angle (cos²) and the model cannot meet it by shrinking the latent
                z = F.normalize(cap.acts[SITE].flatten(0, 1), dim=-1)
                labels_by_concept = {"concept": labels.flatten()}
                ramp = min(1.0, step / (ramp_until * steps))  # weights in from 0, as the toolkit's schedules do
                loss = loss + ramp * sum(weights[t.weight] * t({SITE: z}, labels_by_concept) for t in terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(lm_loss.item())
    return curve


@torch.no_grad()
def latents_and_nats(model: nn.Module, stream: Text, window: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent at every position, and the nats of every token given the text before it (inside its
    window, which is read from a fresh start), stored at the predicted token's position: the first
    token of the stream has nothing before it and gets NaN."""
    zs, nats = [], []
    with Capture(model, [SITE]) as cap:
        for a in range(0, len(stream.ids) - 1, window):
            x = stream.ids[a:a + window + 1]
            logits = model(x[None, :-1])[0]
            zs.append(cap.acts[SITE][0])
            nats.append(F.cross_entropy(logits, x[1:], reduction="none"))
    z = torch.cat(zs)
    n = torch.cat(nats)
    # the target of position t is token t+1: give nats to the predicted token's position
    by_target = torch.full((len(stream.ids),), math.nan)
    by_target[1:1 + len(n)] = n
    return z, by_target


def position_classes(stream: Text, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over the first n positions: concept (a labeller hit or the characters after it) and
    retain (any position of a passage where the labeller never fired)."""
    positive = torch.zeros(int(stream.passage.max()) + 1, dtype=torch.bool)
    positive[stream.passage[stream.concept]] = True
    return stream.concept[:n], ~positive[stream.passage[:n]]


def scores(model: nn.Module, stream: Text, axis: int = 0) -> dict[str, float]:
    """Alignment margin at the latent, and nats/char at concept positions and on retain passages."""
    z, nats = latents_and_nats(model, stream)
    n = len(z)
    concept, retain = position_classes(stream, n)
    cos = F.normalize(z, dim=-1)[:, axis]
    ok = ~torch.isnan(nats[:n])
    return {"margin": float(cos[concept].mean() - cos[retain].mean()),
            "containment": float(cos[retain].mean()),
            "concept nats": float(nats[:n][concept & ok].mean()),
            "retain nats": float(nats[:n][retain & ok].mean())}


def alignment_figure(models: dict[str, nn.Module], stream: Text, path: str, axis: int = 0) -> None:
    """One panel per arm: histograms of cos(z, axis) at concept and at retain positions. The anchored
    arm's concept positions should pile up towards 1 while retain positions stay at 0; the control's
    two histograms should look alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 3.3), sharey=True, squeeze=False)
    bins = np.linspace(-1, 1, 51)
    for ax, (arm, model) in zip(axes[0], models.items()):
        z, _ = latents_and_nats(model, stream)
        concept, retain = position_classes(stream, len(z))
        cos = F.normalize(z, dim=-1)[:, axis]
        ax.hist(cos[retain].numpy(), bins, density=True, alpha=0.6, color="#1f77b4", label=f"retain ({int(retain.sum()):,})")
        ax.hist(cos[concept].numpy(), bins, density=True, alpha=0.6, color="#d62728", label=f"concept ({int(concept.sum()):,})")
        ax.set_title(f"{arm}: margin {float(cos[concept].mean() - cos[retain].mean()):+.3f}")
        ax.set_xlabel(f"cos(latent, axis {axis})")
    axes[0][0].set_ylabel("density (held-out positions)")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"  # written whole, then renamed: an interrupted run leaves no half figure
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def load_passages(corpus: str, limit: int, seed: int) -> list[str]:
    """Up to `limit` passages of a built-in corpus or a folder of .txt files, drawn at random."""
    from anchoring.domains.text.corpus import load_corpus

    everything = load_corpus(corpus).texts
    texts = [t for t in everything if len(t) >= 40]  # shorter ones (headings, one-liners) carry too little context
    if len(texts) < 2:
        raise SystemExit(f"error: {corpus}: {len(texts)} of its {len(everything)} passages have 40 characters or more; "
                         "the example needs more (shorter passages are skipped)")
    pick = np.random.default_rng(seed).permutation(len(texts))[:limit]
    return [texts[i] for i in sorted(pick)]


def run(passages: list[str], *, concept: str = "violence", coverage: float = 0.3, steps: int = 1000, seed: int = 0,
        anchor_weight: float = 1.0, anti_weight: float = 3.0, progress: bool = False,
        figure: str | None = None) -> dict[str, dict[str, float]]:
    """Train both arms, then suppress and delete the anchor axis; every number the script prints (and,
    with `figure`, the arms' alignment histograms as a PNG there)."""
    if not 0 < coverage <= 1:
        raise SystemExit(f"error: coverage {coverage} must be in (0, 1]: the share of concept passages that get labels")
    train_text, held, vocab = split(passages, concept, coverage, seed)
    if not bool(train_text.concept.any()):  # checked before training: nothing to anchor, and no direction to fit
        raise SystemExit(f"error: no training passage holds a {concept!r} word, so there is nothing to label: "
                         "choose another text, or a concept its passages contain")
    if not bool(train_text.labels.any()):
        raise SystemExit(f"error: no training passage is labelled for {concept!r} at coverage {coverage}: give more passages")
    if not bool(held.concept.any()):
        raise SystemExit(f"error: no held-out passage holds the concept {concept!r}: give more passages")
    if not bool(position_classes(held, len(held.ids))[1].any()):
        raise SystemExit(f"error: every held-out passage holds the concept {concept!r}, so there is no retain text to score: "
                         "give more passages")
    probe = held.ids[None, :64]  # one token batch: how the weight edit finds which Linear writes the site
    out: dict[str, dict[str, float]] = {}
    models = {}
    for arm in ("anchored", "control"):
        torch.manual_seed(seed)  # the same initial weights in both arms
        model = CharGRU(vocab)
        train(model, train_text, anchored=arm == "anchored", steps=steps, seed=seed,
                      anchor_weight=anchor_weight, anti_weight=anti_weight, progress=f"training {arm}" if progress else None)
        model.eval()
        models[arm] = model
        out[arm] = scores(model, held)

    anchored, control = models["anchored"], models["control"]
    width = anchored.latent.out_features
    axis = torch.eye(width)[0]
    with intervene(anchored, SITE, lambda z: suppress(z, axis)):  # inference-time: the concept's half-space only
        out["anchored, suppressed"] = scores(anchored, held)
    out["anchored, axis deleted"] = scores(ablate(anchored, [0], site=SITE, probe=probe), held)
    # the post-hoc baseline: the control's difference of means on the training labels, deleted the same way
    z, _ = latents_and_nats(control, train_text)
    direction = mean_difference(z, train_text.labels[:len(z)] > 0)
    out["control, mean-difference deleted"] = scores(ablate_direction(control, direction, site=SITE, probe=probe), held)
    if figure:
        alignment_figure(models, held, figure)
    return out


def positive(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (0 or fewer steps or passages would score untrained models)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not ≥ 1")
    return n


def whole(text: str) -> int:
    """An argparse type: a whole number ≥ 0 (numpy's generators take no negative seed)."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is not ≥ 0")
    return n


def weight(text: str) -> float:
    """An argparse type: a finite weight ≥ 0 (a NaN weight would train to NaN and fail far from its cause)."""
    x = float(text)
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number ≥ 0")
    return x


def figure_path(text: str) -> str:
    """An argparse type: a .png path in a folder that exists, checked before minutes of training."""
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text!r}: the figure is a PNG; give a path ending in .png")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {folder!r} is not a folder this process can write to")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", default="shakespeare", help="shakespeare, milton, mixed or a folder of .txt files")
    p.add_argument("--passages", type=positive, default=3000,
                   help="how many passages to draw from the corpus (those under 40 characters are skipped)")
    p.add_argument("--concept", default="violence", choices=["violence", "deception", "milton"], help="what to anchor")
    p.add_argument("--coverage", type=float, default=0.3, help="share of the training passages with a hit that get labels")
    p.add_argument("--steps", type=positive, default=1000, help="training steps per arm")
    p.add_argument("--seed", type=whole, default=0, help="passages drawn, labels, weights and batches")
    p.add_argument("--anchor", type=weight, default=1.0, help="weight of the pull of labelled positions to the axis")
    p.add_argument("--anti", type=weight, default=3.0, help="weight of the push of every other position out of it")
    p.add_argument("--figure", type=figure_path, default=argparse.SUPPRESS, help="write the arms' alignment histograms to this PNG")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        passages = load_passages(args.corpus, args.passages, args.seed)
    except AnchoringError as e:  # a corpus that is not there: its one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    results = run(passages, concept=args.concept, coverage=args.coverage, steps=args.steps, seed=args.seed,
                  anchor_weight=args.anchor, anti_weight=args.anti, progress=sys.stdout.isatty(), figure=getattr(args, "figure", None))
    before = results["anchored"]
    print(f"{'':34} {'margin':>7} {'contain.':>8} {'concept':>8} {'retain':>7}")
    for name, r in results.items():
        print(f"{name:34} {r['margin']:+7.3f} {r['containment']:8.3f} {r['concept nats']:8.3f} {r['retain nats']:7.3f}")
    print("held-out text; margin: mean cos(latent, axis) at concept positions minus at retain positions; contain.: the "
          "mean at retain positions; concept, retain: next-character loss there, nats/char")
    for name, ref in (("anchored, axis deleted", before), ("control, mean-difference deleted", results["control"])):
        r = results[name]
        print(f"{name}: Δconcept {r['concept nats'] - ref['concept nats']:+.3f}, Δretain {r['retain nats'] - ref['retain nats']:+.3f} nats/char")
    if getattr(args, "figure", None):
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
