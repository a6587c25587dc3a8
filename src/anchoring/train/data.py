"""Batches for an ensemble, drawn so that results never depend on how seeds are grouped.

Each seed owns a random stream made of chunks; chunk c of seed s comes from its own
generator seeded by (s, c). A batch is therefore a pure function of (seed, step): an
ensemble of E seeds sees exactly what E single-seed runs see, and a resumed run
regenerates the same batches without saving any RNG state. Points are chosen by
inverse-CDF lookup of uniforms, so sampling weights may change between steps (curricula)
without disturbing the stream.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 256


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk, 0xA7C]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EnsembleStream:
    """Uniforms `(E, batch, 1 + n_labels)` per step: column 0 picks the point, the rest draw labels."""

    def __init__(self, seeds: list[int], batch_size: int, n_labels: int) -> None:
        self.seeds, self.batch_size, self.width = seeds, batch_size, 1 + n_labels
        self._chunk_id = -1
        self._chunk: torch.Tensor | None = None

    def _load(self, chunk: int) -> None:
        parts = []
        for s in self.seeds:
            g = torch.Generator().manual_seed(_chunk_seed(s, chunk))
            parts.append(torch.rand(CHUNK, self.batch_size, self.width, generator=g))
        self._chunk = torch.stack(parts, dim=1)  # (CHUNK, E, B, W)
        self._chunk_id = chunk

    def __call__(self, step: int) -> torch.Tensor:
        chunk, offset = divmod(step, CHUNK)
        if chunk != self._chunk_id:
            self._load(chunk)
        assert self._chunk is not None
        return self._chunk[offset]


class WeightedPoints:
    """A fixed point set with sampling weights; maps uniforms to indices by inverse CDF."""

    def __init__(self, points: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self.points = points
        self.set_weights(weights if weights is not None else torch.ones(len(points)))

    def set_weights(self, weights: torch.Tensor) -> None:
        if weights.shape != (len(self.points),) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("sampling weights must be non-negative, one per point, and not all zero")
        cdf = torch.cumsum(weights.double(), 0)
        self.cdf = (cdf / cdf[-1]).float()

    def indices(self, uniform: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.cdf, uniform.contiguous(), right=True).clamp_max(len(self.points) - 1)
