"""Read activations at named sites of any nn.Module, in the same forward pass as the task loss."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from anchoring.errors import AnchoringError


def resolve_site(model: nn.Module, site: str) -> nn.Module:
    """The submodule at a dotted path, with an error that lists what exists."""
    try:
        return model.get_submodule(site)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
        raise AnchoringError(f"model has no module {site!r} to hook (modules: {shown})") from None


class Capture:
    """Context manager: while open, `acts[site]` holds each named module's latest output.

    Works under `torch.func.functional_call` and `vmap` (the hooks see batched tensors), so
    the ensemble trainer and a plain eager loop share it. Tuple outputs keep their first item.
    """

    def __init__(self, model: nn.Module, sites: Iterable[str]) -> None:
        self.model = model
        self.sites = sorted({sites} if isinstance(sites, str) else set(sites))  # one site by name, not its letters
        self.acts: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for site in self.sites:  # validate eagerly: fail before any training starts
            resolve_site(model, site)

    def _hook(self, site: str):
        def hook(_module: nn.Module, _inputs: tuple, output):
            self.acts[site] = output[0] if isinstance(output, tuple) else output

        return hook

    def __enter__(self) -> "Capture":
        for site in self.sites:
            self._handles.append(resolve_site(self.model, site).register_forward_hook(self._hook(site)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.acts.clear()
