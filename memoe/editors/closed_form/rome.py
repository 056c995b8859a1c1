"""ROME (Meng et al. 2022): a rank-one equality-constrained update per fact, Δ = r kᵀ C⁻¹ / (kᵀ C⁻¹ k).

With the r-ROME fix: the key is the prefix-averaged key everywhere. A batch is applied as consecutive
single edits (each sees the previous ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memoe.config import ConfigError, bounds
from memoe.editors.closed_form.core import ClosedFormConfig, ClosedFormEditor
from memoe.editors.closed_form.solves import rome_solve


@dataclass
class ROMEConfig(ClosedFormConfig):
    layers: list[int] = field(default_factory=lambda: [0], metadata=bounds(nonempty=True))
    """The single edit layer."""

    def __post_init__(self):
        if len(self.layers) != 1:
            raise ConfigError(f"config key 'layers': ROME edits exactly one layer, got {self.layers}")


class ROMEEditor(ClosedFormEditor):
    name = "rome"
    summary = "a rank-one equality-constrained update per fact; a batch is applied as consecutive single edits"
    paper = "Meng et al. 2022"
    Config = ROMEConfig
    one_at_a_time = True

    def solve(self, R, K, C):
        return rome_solve(R, K, C)
