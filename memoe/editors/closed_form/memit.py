"""MEMIT (Meng et al. 2023): least squares with preservation weight λ, Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹, spread over
several layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from memoe.config import bounds
from memoe.editors.closed_form.core import ClosedFormConfig, ClosedFormEditor
from memoe.editors.closed_form.solves import memit_solve


@dataclass
class MEMITConfig(ClosedFormConfig):
    mom2_update_weight: float = field(default=1e4, metadata=bounds(0.0))
    """λ: weight of preserving C0 (MEMIT's ``mom2_update_weight``)."""


class MEMITEditor(ClosedFormEditor):
    name = "memit"
    summary = "least squares with preservation weight λ, the residual spread over several layers"
    paper = "Meng et al. 2023"
    Config = MEMITConfig

    def solve(self, R, K, C):
        return memit_solve(R, K, C, self.config.mom2_update_weight)
