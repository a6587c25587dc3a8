"""Two training-time unlearning baselines as LM arms, and their deletion edits.

**sgtm** (selective gradient masking, after Shilov et al. 2025). Every chosen block (`sgtm.layers`,
default all) designates *forget* entries: the last `sgtm.heads` attention heads (their rows of q, k
and v, their columns of o, their `s_qk` entries) and the last `round(sgtm.mlp_fraction × hidden)`
MLP hidden units (at least one when the fraction is > 0: their u and v rows of `up`, their columns of
`down`, their `s_u`/`s_v` entries). The choice is deterministic (the last head(s), the last units)
so every seed and every reader of a checkpoint agrees on it. In training the token loss is split
into the cross-entropy of the positions whose target token is weakly labelled and the rest's, both divided by the number of
positions (their sum is the usual mean); the labelled part updates only the forget entries, the
rest updates everything (`train.masking.masked_backward`). The paper also has *retain*-labelled
data that may not touch the forget entries; this toolkit's weak labels are positive-or-unlabelled,
so every unlabelled position updates all parameters (the paper's treatment of unlabelled data).

**routing** (gradient routing, "expand, route, ablate", after Cloud et al. 2024). The MLPs of the
blocks `routing.layers` get `routing.extra_units` extra hidden units (`build_model(…, arm="routing")`;
the other weights start equal to the control's, see `NormalizedTransformer`). In training the task
sets each routed MLP's `route` to the weak labels of the positions' target tokens (`Batch.target_labels`): at labelled positions only the extra
units pass gradients, at the other positions only the original units do (`models.ngpt.routed_down`).
A blocked (position, unit) pair gives no gradient to the unit's `up` rows, scales or `down` column,
nor through its activation to earlier layers. Everything outside the routed MLPs learns from every
position. Where this may differ from the paper: gradient routing as described there masks gradients
on activations, which would still let a `down` column learn from every token; here whole units are
masked. No auxiliary loss is used. A fine-tune on retain text after the ablation, with the extra
units held at zero, is the evaluation's optional repair (`unlearning.repair_steps`), applied to
every edit alike.

**Deletion.** The stored checkpoint is the trained model; `ablated(model, cfg, arm)` returns a copy
with the forget entries (sgtm) or the extra units (routing: their `up` rows, `down` columns and
scales) set to zero, so they contribute nothing.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment
from anchoring.models.ngpt import MLP
from anchoring.train.masking import ParamMasks, zero_entries


def forget_units(hidden: int, fraction: float) -> int:
    """How many of `hidden` MLP units are forget units: round(fraction × hidden), at least one if fraction > 0."""
    return 0 if fraction <= 0 else min(hidden, max(1, round(fraction * hidden)))


def forget_masks(model: nn.Module, cfg: LMExperiment) -> ParamMasks:
    """SGTM's forget entries by parameter name (bool, True = forget), checked against `model`."""
    s = cfg.sgtm
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise AnchoringError("sgtm: the model has no `blocks` (a NormalizedTransformer is expected)")
    layers = list(range(len(blocks))) if s.layers is None else s.layers
    params = dict(model.named_parameters())
    masks: ParamMasks = {}
    for i in layers:
        if not 0 <= i < len(blocks):
            raise AnchoringError(f"sgtm.layers: no block {i} (the model has {len(blocks)} blocks: 0..{len(blocks) - 1})")
        attn, mlp = blocks[i].attn, blocks[i].mlp
        if s.heads > attn.heads:
            raise AnchoringError(f"sgtm.heads = {s.heads} exceeds the model's {attn.heads} heads per block")
        p = f"blocks.{i}."
        m = {n[len(p):]: torch.zeros_like(t, dtype=torch.bool) for n, t in params.items() if n.startswith(p)}
        if s.heads:
            lo = (attn.heads - s.heads) * attn.head_dim
            for lin in ("q", "k", "v"):
                m[f"attn.{lin}.weight"][lo:] = True
            m["attn.o.weight"][:, lo:] = True
            m["attn.s_qk"][attn.heads - s.heads:] = True
        n_units = mlp.s_u.numel()
        k = forget_units(n_units, s.mlp_fraction)
        if k:
            m["mlp.up.weight"][n_units - k:n_units] = True  # u rows
            m["mlp.up.weight"][2 * n_units - k:] = True  # v rows
            m["mlp.down.weight"][:, n_units - k:] = True
            m["mlp.s_u"][n_units - k:] = True
            m["mlp.s_v"][n_units - k:] = True
        masks.update({p + n: v for n, v in m.items() if v.any()})
    return masks


def routed_mlps(model: nn.Module) -> list[MLP]:
    """The MLPs with extra units (the routing arm's routed blocks)."""
    return [m for m in model.modules() if isinstance(m, MLP) and m.extra > 0]


@contextmanager
def routing(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Route the gradients of the forwards inside by `positions` `(B, T)` (True: weakly labelled)."""
    mlps = routed_mlps(model)
    for m in mlps:
        m.route = positions
    try:
        yield
    finally:
        for m in mlps:
            m.route = None


@torch.no_grad()
def ablated(model: nn.Module, cfg: LMExperiment, arm: str) -> nn.Module:
    """A copy of `model` with the arm's deletion applied: SGTM's forget entries zeroed (arm "sgtm"),
    or the extra MLP units' `up` rows, `down` columns and scales zeroed (arm "routing")."""
    if arm == "sgtm":
        out = copy.deepcopy(model)
        zero_entries(dict(out.named_parameters()), forget_masks(out, cfg))
        return out
    if arm == "routing":
        out = copy.deepcopy(model)
        mlps = routed_mlps(out)
        if not mlps:
            raise AnchoringError("routing: this model has no extra MLP units (was it trained as the routing arm?)")
        for m in mlps:
            H, n = m.hidden, m.hidden + m.extra
            m.up.weight[H:n] = 0.0
            m.up.weight[n + H:] = 0.0
            m.down.weight[:, H:] = 0.0
            m.s_u[H:] = 0.0
            m.s_v[H:] = 0.0
        return out
    raise AnchoringError(f"arm {arm!r} has no deletion edit (ablated takes 'sgtm' or 'routing')")
