"""Weight edits as standard PEFT LoRA adapters: keep a frozen base, stack or drop edits.

A delta Δ (out, in) of rank r is written as Δ = B A with B = U_r S_r (out, r) and A = V_rᵀ (r, in) from its
SVD, ``lora_alpha = r`` so PEFT's scaling is 1. The rank defaults to the delta's numerical rank (singular
values above the largest times max(out, in) times the dtype's epsilon, as ``numpy.linalg.matrix_rank``), so the
export is exact to the weights' own precision whatever made the delta: a one-pass closed-form edit
of N facts has rank <= N, but several rounds, or FT's gradient steps, give more. At the layer width the
factorisation is simply a dense one. ``peft.PeftModel.from_pretrained(base, path)`` then reproduces the edited
model. A smaller ``rank`` asked for explicitly is honoured with a warning that says how much of the edit it drops.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from memoe.io import save_tensors, write_json
from memoe.models.arch import model_parts


def factorize(delta: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (out, r), A (r, in), dropped) with B A the best rank-``r`` approximation of ``delta``: ``r = rank``, or
    the numerical rank of ``delta`` when None; ``dropped`` is the share of ||Δ||_F the approximation loses."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    tol = S[0] * max(delta.shape) * torch.finfo(delta.dtype).eps if S.numel() else 0.0
    numerical = max(1, int((S > tol).sum()))
    r = min(rank or numerical, S.numel())
    dropped = float(S[r:].norm() / S.norm()) if S.norm() > 0 else 0.0
    return (U[:, :r] * S[:r]).float(), Vh[:r].float(), dropped


def save_lora(model, deltas: dict[str, torch.Tensor], path: str | os.PathLike, rank: int | None = None) -> Path:
    """Write ``deltas`` (parameter name -> change, as ``EditResult.deltas``) as a PEFT LoRA adapter folder.

    ``rank``: LoRA rank per module (default: each delta's numerical rank, which makes the export exact).
    """
    from peft import LoraConfig

    parts = model_parts(model)
    transposed = parts.spec.down_proj_transposed
    tensors, modules, ranks = {}, [], {}
    for name, delta in deltas.items():
        if not name.endswith(".weight"):
            raise ValueError(f"only weight deltas can be exported as LoRA, got {name!r}")
        module = name[: -len(".weight")]
        d = delta.T if transposed else delta  # (out, in)
        B, A, dropped = factorize(d, rank)
        r = A.shape[0]
        if rank is not None and dropped > 1e-3:
            warnings.warn(f"LoRA export of {module} at rank {r} drops {dropped:.1%} of the edit (Frobenius norm); "
                          "leave rank unset for an exact export", stacklevel=2)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
        modules.append(module)
        ranks[module] = r
    first = next(iter(ranks.values()))
    cfg = LoraConfig(
        r=first, lora_alpha=first, target_modules=modules, lora_dropout=0.0, bias="none",
        rank_pattern={m: r for m, r in ranks.items()}, alpha_pattern={m: r for m, r in ranks.items()},
        fan_in_fan_out=transposed, base_model_name_or_path=getattr(model, "name_or_path", None) or None,
        task_type="CAUSAL_LM",
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    cfg_dict = cfg.to_dict()
    cfg_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg_dict.items()}
    write_json(path / "adapter_config.json", cfg_dict)
    return path


def load_lora(base, path: str | os.PathLike):
    """``peft.PeftModel.from_pretrained(base, path)``: the edit on top of an unedited base.
    ``.unload()`` on the result gives the base back untouched."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path))
