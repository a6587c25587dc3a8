"""Where a deleted concept lands: the latent a concept is left with after its dims are ablated.

Ablating dims D (zeroing the rows of the Linear that writes the latent and the columns of the
Linear that reads it) does not send the concept to "nowhere". With an L2-normalised latent the
ablated encoder writes the concept's pre-normalisation vector with D set to zero, and the
normalisation then blows its small *residual* (the part orthogonal to D) back up to unit
length. The decoder sees that residual direction as if it were an ordinary latent, and
decodes it to whatever colour the rest of the sphere has put there. So whether a deletion is
clean is decided by what lives at the residual's direction, not by how well the concept was
anchored: a concept at cos 0.99 to its anchor still has a residual, and only its direction
matters after the edit.

Everything here is a pure function of tensors and models so it can be used on any run
(`anchoring.runs.load_run(path).models`) and tested on hand-built cases.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchoring.control.surgery import ablate
from anchoring.domains.colour import GREY_NAMES, NAMES, named_rgb


def residual_direction(z: torch.Tensor, dims: Sequence[int], eps: float = 1e-12) -> torch.Tensor:
    """Unit latent `(..., D)` left after zeroing `dims` of `z` and renormalising.

    For a model whose latent is L2-normalised right after the Linear that writes it, this is
    exactly the latent the *ablated* model computes: zeroing a row of the writer zeroes that
    coordinate before normalisation, and renormalising z̃ = z/‖z‖ with the same coordinate
    removed gives the same unit vector (the scale ‖z‖ cancels). A residual of exactly zero
    (the concept entirely inside `dims`) stays zero rather than becoming NaN.
    """
    keep = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device)
    keep[list(dims)] = 0.0
    r = z * keep
    return r / r.norm(dim=-1, keepdim=True).clamp_min(eps)


def residual_norm(z: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """‖z outside `dims`‖ / ‖z‖ `(...)`: the sine of z's angle to the subspace of `dims`.

    Small means the concept sat well inside its dims; the *direction* of that small residual is
    then set by whatever details of training were left over, which is why it can land anywhere.
    """
    keep = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device)
    keep[list(dims)] = 0.0
    return (z * keep).norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-12)


def cosines(z: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine of each query `(..., D)` to each reference `(..., R, D)` (or `(R, D)`): `(..., R)`."""
    return (F.normalize(z, dim=-1).unsqueeze(-2) * F.normalize(references, dim=-1)).sum(-1)


def nearest(cos: torch.Tensor, names: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """The `k` names with the highest cosine, per row of `cos` `(S, R)`: [(name, cos), …] per row."""
    top = cos.topk(min(k, cos.shape[-1]), dim=-1)
    return [[(names[int(j)], float(v)) for v, j in zip(vals, idx)] for vals, idx in zip(top.values, top.indices)]


def ablated_latent(model: nn.Module, x: torch.Tensor, dims: Sequence[int], site: str = "latent") -> torch.Tensor:
    """What the ablated model itself computes at `site` for inputs `x` (via `control.surgery.ablate`).

    The reference for `residual_direction`: the two must agree, otherwise the analysis explains
    a different edit from the one the tables score.
    """
    edited = ablate(model, dims, site)
    with torch.no_grad():
        return edited.encode(x)


def deletion_landing(
    models: Sequence[nn.Module],
    dims: Sequence[int],
    concept_rgb: torch.Tensor | None = None,
    *,
    references: torch.Tensor | None = None,
    names: Sequence[str] = NAMES,
    k: int = 3,
) -> dict:
    """Per seed: where `concept_rgb` (default: named red) lands after ablating `dims`, and what it decodes to.

    `references` `(R, 3)` are the colours it is compared with (default: the named colours,
    whose *unedited* latents are what the decoder learned to read). Returns tensors with a
    leading seed axis plus the top-`k` nearest names per seed:

    - `before` `(S, D)`: the concept's latent in the unedited model;
    - `after` `(S, D)`: its latent after the edit (`residual_direction`);
    - `residual_norm` `(S,)`: how much of it lay outside `dims` before the edit;
    - `reference_latents` `(S, R, D)`: the references' latents, unedited;
    - `cos_after` `(S, R)`: cos(after, reference latents); `cos_before` likewise;
    - `cos_grey_centre` `(S,)`: cos(after, normalised mean of the greys' latents), a direction the
      decoder tends to read as a neutral colour (only when the default names are used);
    - `decoded` `(S, 3)`: the ablated model's output for the concept; `error` `(S,)`: its MSE
      (output clamped to [0, 1], as in `evaluate.control.colour_errors`);
    - `decoded_nearest` `(S,)`: index of the reference colour closest in RGB to `decoded`;
    - `nearest` / `nearest_before`: top-`k` (name, cos) per seed.
    """
    ref = named_rgb() if references is None else references
    names = list(names)
    concept = named_rgb()[0:1] if concept_rgb is None else concept_rgb.reshape(1, 3)  # named red, whatever the references
    dims = list(dims)
    before, refs, decoded = [], [], []
    with torch.no_grad():
        for m in models:
            before.append(m.encode(concept)[0])
            refs.append(m.encode(ref))
            decoded.append(ablate(m, dims).forward(concept)[0])
    z0 = torch.stack(before)
    zr = torch.stack(refs)
    after = residual_direction(z0, dims)
    out = torch.stack(decoded)
    cos_after = cosines(after, zr)
    cos_before = cosines(z0, zr)
    result = {
        "before": z0, "after": after, "residual_norm": residual_norm(z0, dims),
        "reference_latents": zr, "cos_after": cos_after, "cos_before": cos_before,
        "decoded": out, "error": (out.clamp(0, 1) - concept).pow(2).mean(-1),
        "decoded_nearest": torch.cdist(out.clamp(0, 1), ref).argmin(-1),
        "nearest": nearest(cos_after, names, k), "nearest_before": nearest(cos_before, names, k),
        "names": names,
    }
    grey_idx = [names.index(g) for g in GREY_NAMES if g in names]
    if references is None and grey_idx:
        centre = F.normalize(zr[:, grey_idx].mean(1), dim=-1)
        result["cos_grey_centre"] = cosines(after, centre.unsqueeze(1))[:, 0]
    return result


def nearest_on_grid(models: Sequence[nn.Module], after: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per seed, the grid colour whose *unedited* latent is closest (by cosine) to `after` `(S, D)`.

    The named colours are 17 points; the rest of the sphere is filled (or not) by everything
    else the model encodes. A cosine near 1 here means the residual landed on territory some
    real colour owns, and the decoder will return roughly that colour; a low cosine means it
    landed on an unclaimed patch, where the decoder's output is an extrapolation. Returns
    `rgb` `(S, 3)` and `cos` `(S,)`.
    """
    best_rgb, best_cos = [], []
    with torch.no_grad():
        for i, m in enumerate(models):
            c = cosines(after[i], m.encode(grid))
            j = int(c.argmax())
            best_rgb.append(grid[j])
            best_cos.append(c[j])
    return {"rgb": torch.stack(best_rgb), "cos": torch.stack(best_cos)}


def landing_rows(landing: dict, seeds: Sequence[int]) -> list[dict]:
    """One plain-Python row per seed (for JSON or a table): error, residual norm, nearest names, decoded RGB."""
    names = landing["names"]
    rows = []
    for i, s in enumerate(seeds):
        row = {
            "seed": int(s),
            "error": float(landing["error"][i]),
            "residual_norm": float(landing["residual_norm"][i]),
            "nearest": [[n, round(c, 4)] for n, c in landing["nearest"][i]],
            "decoded": [round(float(v), 4) for v in landing["decoded"][i]],
            "decoded_as": names[int(landing["decoded_nearest"][i])],
            "cos_after": {n: float(landing["cos_after"][i, j]) for j, n in enumerate(names)},
        }
        if "cos_grey_centre" in landing:
            row["cos_grey_centre"] = float(landing["cos_grey_centre"][i])
        rows.append(row)
    return rows
