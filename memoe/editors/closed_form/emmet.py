"""EMMET (Gupta et al. 2024): batched equality constraints, Δ = R (Kᵀ C0⁻¹ K + λ_e I)⁻¹ Kᵀ C0⁻¹."""

from __future__ import annotations

from dataclasses import dataclass, field

from memoe.config import bounds
from memoe.editors.closed_form.core import ClosedFormConfig, ClosedFormEditor
from memoe.editors.closed_form.solves import emmet_solve


@dataclass
class EMMETConfig(ClosedFormConfig):
    emmet_lambda: float = field(default=0.0, metadata=bounds(0.0))
    """λ_e: ridge on the edits' Gram matrix (0: exact equality constraints)."""


class EMMETEditor(ClosedFormEditor):
    name = "emmet"
    summary = "batched equality constraints relaxed by a ridge λ_e (at λ_e = λ it computes MEMIT's update)"
    paper = "Gupta et al. 2024"
    Config = EMMETConfig

    def solve(self, R, K, C):
        return emmet_solve(R, K, C, self.config.emmet_lambda)
