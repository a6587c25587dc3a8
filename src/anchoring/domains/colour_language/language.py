"""A tiny colour language: packed lines of colour equations, for next-token prediction.

    a + b = c ;     mix (per-channel mean on the lattice)
    ~ a = c ;       complement (each channel mirrored)
    ^ a = c ;       lighten (each channel one level up, saturating)

Every position carries a *role* (which slot of its line it is) and a *line index*, so the
method can anchor a named slot or pool over a labelled line without knowing the grammar.
A held-out share of unordered mix pairs never appears in training (both orders withheld).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from anchoring.domains.colour_language.lattice import Lattice
from anchoring.errors import AnchoringError

OPERATORS = ("+", "=", "~", "^", ";")
OPS = ("mix", "complement", "lighten")
# roles of positions within a line
ROLES = ("a", "b", "op", "eq", "answer", "end")
ROLE = {name: i for i, name in enumerate(ROLES)}
PAD = -1


@dataclass
class Batch:
    """`inputs`/`targets` `(B, T)` token ids; `roles`/`line` `(B, T)` per input position;
    `colours` `(B, K, 3)` the (a, b, c) tokens of each line (b = −1 when unary), `ops` `(B, K)`."""

    inputs: torch.Tensor
    targets: torch.Tensor
    roles: torch.Tensor
    line: torch.Tensor
    colours: torch.Tensor
    ops: torch.Tensor

    @property
    def answer_query(self) -> torch.Tensor:
        """`(B, T)` True at each '=' whose answer is the next target: where exact match is scored."""
        return self.roles == ROLE["eq"]


@dataclass
class ColourLanguage:
    """Vocabulary, operations and train/held-out splits over a lattice."""

    lattice: Lattice = field(default_factory=Lattice)
    mix_rule: str = "exact"  # 'exact': only pairs whose mean lands on the lattice; 'half-up': all pairs, rounded
    held_out: float = 0.2
    split_seed: int = 1234

    def __post_init__(self) -> None:
        if self.mix_rule not in ("exact", "half-up"):
            raise AnchoringError(f"mix_rule must be 'exact' or 'half-up', got {self.mix_rule!r}")
        if not 0.0 <= self.held_out < 1.0:
            raise AnchoringError(f"held_out must be in [0, 1), got {self.held_out}")
        n = self.lattice.size
        a, b = torch.triu_indices(n, n)  # unordered pairs, a ≤ b
        if self.mix_rule == "exact":
            keep = self.lattice.mix_is_exact(a, b)
            a, b = a[keep], b[keep]
        g = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(a), generator=g)
        cut = int(round(len(a) * self.held_out))
        self._held = torch.stack([a[order[:cut]], b[order[:cut]]], -1)
        self._seen = torch.stack([a[order[cut:]], b[order[cut:]]], -1)

    # vocabulary -------------------------------------------------------------------------
    @property
    def n_colours(self) -> int:
        return self.lattice.size

    @property
    def vocab_size(self) -> int:
        return self.n_colours + len(OPERATORS)

    def op_token(self, symbol: str) -> int:
        return self.n_colours + OPERATORS.index(symbol)

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of whitespace-separated words: a colour as its three channel levels
        (`500` is red on 6 levels) and the operators `+ = ~ ^ ;`."""
        ids = []
        L = self.lattice.levels
        for word in text.split():
            if word in OPERATORS:
                ids.append(self.op_token(word))
            elif len(word) == 3 and word.isascii() and word.isdigit() and all(int(ch) < L for ch in word):
                ids.append(int(self.lattice.token(torch.tensor([int(ch) for ch in word]))))
            else:
                raise AnchoringError(f"{word!r} is not a word of the colour language (colours are three levels "
                                     f"0..{L - 1} like '{L - 1}00'; operators: {' '.join(OPERATORS)})")
        return torch.tensor(ids, dtype=torch.long)

    def words(self, tokens: torch.Tensor) -> list[str]:
        """The inverse of `tokenize`, one word per token."""
        out = []
        for t in tokens.tolist():
            if t >= self.n_colours:
                out.append(OPERATORS[t - self.n_colours] if t - self.n_colours < len(OPERATORS) else "?")
            else:
                out.append("".join(str(int(c)) for c in self.lattice.channels(torch.tensor(t))))
        return out

    # splits -----------------------------------------------------------------------------
    def mix_pairs(self, split: str) -> torch.Tensor:
        """`(P, 2)` unordered pairs (a ≤ b) of the 'seen' or 'held-out' split."""
        if split not in ("seen", "held-out"):
            raise AnchoringError(f"unknown split {split!r} (seen, held-out)")
        return self._seen if split == "seen" else self._held

    def answer(self, op: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lat = self.lattice
        mixed = lat.mix(a, b.clamp_min(0))
        return torch.where(op == 0, mixed, torch.where(op == 1, lat.complement(a), lat.lighten(a)))

    # lines ------------------------------------------------------------------------------
    def lines(self, op: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token and role rows `(K, 6)` (PAD-filled for unary lines) and the answers `(K,)`."""
        c = self.answer(op, a, b)
        plus, eq, end = self.op_token("+"), self.op_token("="), self.op_token(";")
        unary_sym = torch.where(op == 1, self.op_token("~"), self.op_token("^"))
        pad = torch.full_like(a, PAD)
        mix_row = torch.stack([a, torch.full_like(a, plus), b, torch.full_like(a, eq), c, torch.full_like(a, end)], -1)
        un_row = torch.stack([unary_sym, a, torch.full_like(a, eq), c, torch.full_like(a, end), pad], -1)
        is_mix = (op == 0).unsqueeze(-1)
        tokens = torch.where(is_mix, mix_row, un_row)
        R = ROLE
        mix_roles = torch.tensor([R["a"], R["op"], R["b"], R["eq"], R["answer"], R["end"]])
        un_roles = torch.tensor([R["op"], R["a"], R["eq"], R["answer"], R["end"], PAD])
        roles = torch.where(is_mix, mix_roles, un_roles)
        return tokens, roles, c

    def sample_lines(self, n: int, generator: torch.Generator, *, split: str = "seen",
                     op_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> tuple[torch.Tensor, ...]:
        """`n` random (op, a, b) triples; mix pairs come from `split` in a random order."""
        op = torch.multinomial(torch.tensor(op_weights, dtype=torch.float), n, replacement=True, generator=generator)
        pairs = self.mix_pairs(split)
        pick = pairs[torch.randint(len(pairs), (n,), generator=generator)]
        swap = torch.rand(n, generator=generator) < 0.5
        a_mix = torch.where(swap, pick[:, 1], pick[:, 0])
        b_mix = torch.where(swap, pick[:, 0], pick[:, 1])
        a_un = torch.randint(self.n_colours, (n,), generator=generator)
        a = torch.where(op == 0, a_mix, a_un)
        b = torch.where(op == 0, b_mix, torch.full_like(a, PAD))
        return op, a, b

    def pack(self, op: torch.Tensor, a: torch.Tensor, b: torch.Tensor, context: int) -> Batch:
        """Pack `(B, K)` lines into sequences of `context` inputs (+1 target), cut at the end."""
        B, K = op.shape
        tokens, roles, c = self.lines(op.reshape(-1), a.reshape(-1), b.reshape(-1))
        tokens, roles = tokens.view(B, K * 6), roles.view(B, K * 6)
        line_ids = torch.arange(K).repeat_interleave(6).expand(B, -1)
        keep = tokens != PAD
        if int(keep.sum(1).min()) < context + 1:
            raise AnchoringError(f"{K} lines per sequence are too few to fill a context of {context}")
        seq = torch.stack([tokens[i][keep[i]][: context + 1] for i in range(B)])
        rol = torch.stack([roles[i][keep[i]][: context] for i in range(B)])
        lin = torch.stack([line_ids[i][keep[i]][: context] for i in range(B)])
        colours = torch.stack([a, b, c.view(B, K)], -1)
        return Batch(seq[:, :-1], seq[:, 1:], rol, lin, colours, op)

    def pack_whole(self, op: torch.Tensor, a: torch.Tensor, b: torch.Tensor, context: int) -> tuple[Batch, torch.Tensor]:
        """Pack flat lines whole, `context // 6` per sequence, padding with ';' (for evaluation).

        Returns the batch and `(N, 2)` (sequence, line) coordinates of every input line, so a
        score read at each '=' maps back to the line it belongs to.
        """
        per = context // 6
        if per < 1:
            raise AnchoringError(f"a context of {context} cannot hold one whole line")
        n = len(op)
        rows = -(-n // per)
        fill = rows * per - n
        pad_op = torch.cat([op, torch.ones(fill, dtype=op.dtype)])  # filler complements, never scored
        pad_a = torch.cat([a, torch.zeros(fill, dtype=a.dtype)])
        pad_b = torch.cat([b, torch.full((fill,), PAD, dtype=b.dtype)])
        tokens, roles, c = self.lines(pad_op, pad_a, pad_b)
        tokens, roles = tokens.view(rows, per * 6), roles.view(rows, per * 6)
        line_ids = torch.arange(per).repeat_interleave(6).expand(rows, -1)
        end = self.op_token(";")
        seq = torch.full((rows, context + 1), end)
        rol = torch.full((rows, context), ROLE["end"])
        lin = torch.full((rows, context), per)  # padding belongs to no line
        for i in range(rows):
            keep = tokens[i] != PAD
            k = int(keep.sum())
            seq[i, :k] = tokens[i][keep]
            rol[i, :k] = roles[i][keep]
            lin[i, :k] = line_ids[i][keep]
        colours = torch.stack([pad_a, pad_b, c], -1).view(rows, per, 3)
        where = torch.stack([torch.arange(n) // per, torch.arange(n) % per], -1)
        return Batch(seq[:, :-1], seq[:, 1:], rol, lin, colours, pad_op.view(rows, per)), where

    def batch(self, size: int, context: int, generator: torch.Generator, *, split: str = "seen",
              op_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> Batch:
        K = context // 5 + 2  # enough lines even if all are 5 tokens long
        op, a, b = self.sample_lines(size * K, generator, split=split, op_weights=op_weights)
        return self.pack(op.view(size, K), a.view(size, K), b.view(size, K), context)
