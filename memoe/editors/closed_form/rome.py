"""ROME (Meng et al. 2022): a rank-one equality-constrained update per fact, Δ = r kᵀ C⁻¹ / (kᵀ C⁻¹ k).

With the r-ROME fix: the key is the prefix-averaged key everywhere. A batch is applied as consecutive
single edits (each sees the previous ones).

Ours, off by default (``bare_key``): the bare prompt's own key as a second equality constraint on the same
rank-one update. On a model without a BOS token (SmolLM2), a prompt that opens with its subject reads the key at
the sequence's first positions, where attention sinks: that key is far from the prefix average (cosine 0.35-0.58
on the CounterFact records whose edits failed), so the averaged key alone leaves the bare prompt unedited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memoe.config import ConfigError, bounds
from memoe.editors.closed_form.core import ClosedFormConfig, ClosedFormEditor, compute_keys
from memoe.editors.closed_form.solves import rome_solve


@dataclass
class ROMEConfig(ClosedFormConfig):
    layers: list[int] = field(default_factory=lambda: [0], metadata=bounds(nonempty=True))
    """The single edit layer."""
    bare_key: bool = False
    """Also map the bare prompt's own key (no prefix) to the target (ours; see the module doc): the update stays
    rank one, Δ = r aᵀ with aᵀk = 1 for the prefix-averaged and the bare key. No effect without context prefixes."""

    def __post_init__(self):
        if len(self.layers) != 1:
            raise ConfigError(f"config key 'layers': ROME edits exactly one layer, got {self.layers}")


class ROMEEditor(ClosedFormEditor):
    name = "rome"
    summary = "a rank-one equality-constrained update per fact; a batch is applied as consecutive single edits"
    paper = "Meng et al. 2022"
    Config = ROMEConfig
    one_at_a_time = True

    def keys(self, model, tok, requests, layer, cfg):
        K = compute_keys(model, tok, requests, layer, cfg)  # (d, 1) the prefix-averaged key
        if not (cfg.bare_key and cfg.context_prefixes):
            return K
        return torch.cat([K, compute_keys(model, tok, requests, layer, cfg, prefixes=[])], dim=1)  # (d, 2)

    def solve(self, R, K, C):
        return rome_solve(R, K, C)
