"""Closed-form editors on one shared core: ROME, MEMIT, EMMET."""

from memoe.editors.closed_form.core import ClosedFormConfig, ClosedFormEditor, compute_keys, compute_targets
from memoe.editors.closed_form.emmet import EMMETConfig, EMMETEditor
from memoe.editors.closed_form.memit import MEMITConfig, MEMITEditor
from memoe.editors.closed_form.rome import ROMEConfig, ROMEEditor
from memoe.editors.closed_form.solves import emmet_solve, memit_solve, rome_solve, spd_solve

__all__ = [
    "ClosedFormConfig", "ClosedFormEditor", "EMMETConfig", "EMMETEditor", "MEMITConfig", "MEMITEditor", "ROMEConfig",
    "ROMEEditor", "compute_keys", "compute_targets", "emmet_solve", "memit_solve", "rome_solve", "spd_solve",
]
