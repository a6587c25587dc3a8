"""E seeds of one architecture with stacked weights, run in lockstep through `torch.func.vmap`.

Generic over any nn.Module: the stacked parameters are plain leaf tensors `(E, ...)`, so a
single fused Adam updates every member at once (Adam is element-wise, so the members stay
independent), and forward hooks on the template module still see each member's activations.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from anchoring.anchor import Capture
from anchoring.train.stacked import StackedChain, try_stacked


class Ensemble:
    """Many seeds of one model as stacked parameters, trained together through `vmap` (or the stacked
    fast path): one process trains 60 seeds for little more than the cost of one."""

    def __init__(self, make_model: Callable[[], nn.Module], seeds: list[int]) -> None:
        members = []
        for s in seeds:
            torch.manual_seed(s)  # each member initialised exactly as a single-seed run would be
            members.append(make_model())
        self.seeds = list(seeds)
        self.template = copy.deepcopy(members[0])
        self.params, self.buffers = stack_module_state(members)

    def __len__(self) -> int:
        return len(self.seeds)

    def run(self, fn: Callable, capture: Capture, *batched: object):
        """vmap `fn(output, acts, *per_member_args)` over members; `fn` sees one member's view."""

        def member(params, buffers, x, *rest):
            out = functional_call(self.template, (params, buffers), (x,))
            return fn(out, dict(capture.acts), x, *rest)

        return vmap(member)(self.params, self.buffers, *batched)

    def fast_path(self, sites: list[str]) -> StackedChain | None:
        """The stacked-matmul forward for this model if it qualifies (see `train.stacked`), else None."""
        first = next((m for m in self.template.modules() if isinstance(m, nn.Linear)), None)

        def generic(x: torch.Tensor):
            with Capture(self.template, sites) as cap:
                return self.run(lambda out, acts, _x: (out, acts), cap, x)

        return try_stacked(self.template, sites, self.params, self.buffers, generic,
                           first.in_features if first is not None else None)

    def capture_at(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """Activations at `site` for inputs `(E, N, ...)`, without gradients."""
        with torch.no_grad(), Capture(self.template, [site]) as cap:
            return self.run(lambda _out, acts, _x: acts[site], cap, x)

    def members(self) -> list[nn.Module]:
        """Independent eager copies, one per seed (for evaluation and export)."""
        out = []
        for i in range(len(self)):
            m = copy.deepcopy(self.template)
            m.load_state_dict({k: v[i].detach().clone() for k, v in {**self.params, **self.buffers}.items()})
            out.append(m)
        return out
