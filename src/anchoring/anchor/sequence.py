"""Anchoring on sequences: which vectors of a site a term reads, and how a line's positions pool.

A concept label belongs to a *line* (a span of positions), not to a token, so a term needs
a position selector:

- `all`      every position (e.g. anti-subspace clears the anchor direction everywhere);
- `slot:R`   positions whose role is R (e.g. `slot:a`, the first operand of each line);
- `mellowmax:ω`  per labelled line, a soft minimum of the per-position loss over the line's
  positions, `−(1/ω)·log mean_t exp(−ω·ℓ_t)`: its gradient weights are a softmax of −ω·ℓ,
  so the pull goes mostly to the position already closest to the anchor — the concept's
  token is found without being told where it is. On a term that selects *unlabelled* lines
  (anti-anchor, anti-subspace) it is the soft *maximum* `(1/ω)·log mean_t exp(ω·ℓ_t)`: a line
  without the label is charged for its worst position. The pair is multiple-instance learning:
  a labelled line needs one position on the anchor, an unlabelled line may have none. Without
  the second half a model satisfies the pull by putting a token that every line has (a space,
  a newline) on the anchor, which a per-position mean penalty barely notices.

Sites read `(B, T, D)` activations, or one head of `(B, H, T, d)` query/key activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from anchoring.anchor.terms import Concept, check_weights
from anchoring.errors import AnchoringError


@dataclass(frozen=True)
class SequenceSite:
    """A module path, plus a head index when the module's output is `(B, H, T, d)`."""

    module: str
    head: int | None = None

    def read(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """This site's `(B, T, D)` states from the captured activations, each mistake named (a module
        that never runs, a head that does not exist) instead of a shape error deep in a formula."""
        if self.module not in acts:  # a module that exists but is not called (its weight is read directly)
            raise AnchoringError(f"site {self.module!r} does not run in the model's forward pass, so it has no "
                                 f"activations to anchor; pick a module that is called (a block's output, say)")
        x = acts[self.module]
        if self.head is None:
            if x.dim() != 3:
                raise AnchoringError(f"site {self.module!r} gives {tuple(x.shape)}; name a head for per-head outputs")
            return x
        if x.dim() != 4 or not 0 <= self.head < x.shape[1]:
            raise AnchoringError(f"site {self.module!r} has no head {self.head} (output {tuple(x.shape)})")
        return x[:, self.head]

    def __str__(self) -> str:
        return self.module if self.head is None else f"{self.module}[head {self.head}]"


@dataclass(frozen=True)
class Positions:
    """A parsed position selector: kind ∈ all | slot | mellowmax."""

    kind: str
    role: int | None = None
    omega: float = 10.0

    @staticmethod
    def parse(text: str, roles: dict[str, int]) -> "Positions":
        """`all`, `slot:NAME` (a role of the domain's `roles`) or `mellowmax[:ω]`, from a config string."""
        kind, _, arg = text.partition(":")
        if kind == "all" and not arg:
            return Positions("all")
        if kind == "slot":
            if arg not in roles:
                raise AnchoringError(f"position selector {text!r}: unknown slot {arg!r} (slots: {', '.join(roles)})")
            return Positions("slot", role=roles[arg])
        if kind == "mellowmax":
            try:
                omega = float(arg) if arg else 10.0
            except ValueError:
                raise AnchoringError(f"position selector {text!r}: ω must be a number") from None
            if not (0 < omega <= 1e6):  # beyond, float32 losses give NaN values (ω = 1e6 already takes the minimum)
                raise AnchoringError(f"position selector {text!r}: ω must be a positive number up to 1e6")
            return Positions("mellowmax", omega=omega)
        raise AnchoringError(f"unknown position selector {text!r} (all | slot:<role> | mellowmax[:ω])")


def position_labels(line_labels: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """Spread `(B, K)` line labels to `(B, T)` positions through each position's line index."""
    return torch.gather(line_labels, 1, line)


def soft_minimum(losses: torch.Tensor, mask: torch.Tensor, omega: float) -> torch.Tensor:
    """Mellowmax soft minimum over the last dim where `mask` is True: −(1/ω)·log mean exp(−ω·ℓ).

    Lies between the minimum (ω → ∞) and the mean (ω → 0). Rows with no True entry give 0.
    """
    x = (-omega * losses).masked_fill(~mask, float("-inf"))
    n = mask.sum(-1)
    lse = torch.logsumexp(x, dim=-1) - torch.log(n.clamp_min(1).to(losses.dtype))
    return torch.where(n > 0, -lse / omega, torch.zeros_like(lse))


def pooled_lines(per_position: torch.Tensor, line: torch.Tensor, line_labels: torch.Tensor, omega: float,
                 select: str = "labelled") -> tuple[torch.Tensor, torch.Tensor]:
    """Per line `(B, K)`: the soft minimum over its positions (select = labelled) or the soft
    maximum (select = unlabelled), and each line's weight (1 for a selected line present in the row)."""
    K = line_labels.shape[1]
    member = line.unsqueeze(1) == torch.arange(K, device=line.device).view(1, K, 1)  # (B, K, T)
    x = per_position.unsqueeze(1).expand(-1, K, -1)
    present = member.any(-1).to(per_position.dtype)
    if select == "unlabelled":
        return -soft_minimum(-x, member, omega), (1.0 - line_labels) * present
    return soft_minimum(x, member, omega), line_labels * present


def pool_lines(per_position: torch.Tensor, line: torch.Tensor, line_labels: torch.Tensor, omega: float,
               select: str = "labelled") -> torch.Tensor:
    """Mean over the selected lines of each line's pooled value (see `pooled_lines`); 0 when none is.

    `per_position` `(B, T)`, `line` `(B, T)` line index per position, `line_labels` `(B, K)`.
    """
    pooled, w = pooled_lines(per_position, line, line_labels, omega, select)
    return (pooled * w).sum() / w.sum().clamp_min(1.0)


@dataclass
class SequenceTerm:
    """One regularizer on a sequence site: formula `(…, D) → (…)`, positions, and which lines."""

    name: str
    kind: str
    weight: str
    site: SequenceSite
    formula: Callable[[torch.Tensor], torch.Tensor]
    positions: Positions
    concept: str | None = None
    select: str = "all"  # all | labelled | unlabelled (lines)
    direction: torch.Tensor | None = None  # the anchor's direction, for evaluation and interventions

    def __call__(self, acts: dict[str, torch.Tensor], roles: torch.Tensor, line: torch.Tensor,
                 line_labels: dict[str, torch.Tensor], labels: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`labels`: per-position `(B, T)` labels per concept, where they are finer than the lines'
        (text labelled by spans); by default every position takes its line's label."""
        total, weight = self.parts(acts, roles, line, line_labels, labels)
        return total / weight.clamp_min(1.0)

    def parts(self, acts: dict[str, torch.Tensor], roles: torch.Tensor, line: torch.Tensor,
              line_labels: dict[str, torch.Tensor], labels: dict[str, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The term as its weighted sum and its total weight, apart: the term is their ratio, and a
        data-parallel caller adds up the weights of every rank's batch before it divides."""
        ell = self.formula(self.site.read(acts))  # (B, T)
        if self.positions.kind == "mellowmax":
            check_weights(line_labels[self.concept], self.name, self.concept)
            pooled, w = pooled_lines(ell, line, line_labels[self.concept], self.positions.omega, self.select)
            return (pooled * w).sum(), w.sum()
        w = torch.ones_like(ell)
        if self.positions.kind == "slot":
            w = w * (roles == self.positions.role)
        if self.select != "all":
            lab = labels[self.concept] if labels is not None else position_labels(line_labels[self.concept], line)
            check_weights(lab, self.name, self.concept)
            w = w * (lab if self.select == "labelled" else 1.0 - lab)
        return (ell * w).sum(), w.sum()


@dataclass
class SequenceObjective:
    """A sequence model's concepts and terms, which name the modules whose activations are captured."""

    concepts: dict[str, Concept]
    terms: list[SequenceTerm]

    @property
    def modules(self) -> list[str]:
        return sorted({t.site.module for t in self.terms})

    @property
    def weight_names(self) -> list[str]:
        return list(dict.fromkeys(t.weight for t in self.terms))

    def anchors(self, concept: str) -> list[tuple[SequenceSite, torch.Tensor]]:
        """Every (site, unit direction) where `concept` is anchored, in term order, without repeats."""
        seen: dict[SequenceSite, torch.Tensor] = {}
        for t in self.terms:
            if t.concept == concept and t.kind == "anchor" and t.site not in seen:
                seen[t.site] = torch.nn.functional.normalize(t.direction, dim=-1)
        return list(seen.items())
