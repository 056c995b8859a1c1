"""Standard PEFT LoRA adapters: weight edits exported as LoRA, and trained LoRA (LTE's alignment) attached in place.

**Attached in place** (:func:`inject_lora` / :func:`remove_lora`): peft wraps the targeted modules of the plain
model (``peft.inject_adapter_in_model``), so scoring and generation code see the same model object; removing puts
the original modules (and the parameters' ``requires_grad`` flags) back, so the base is given back bit for bit.
:func:`save_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors`` atomically, as peft names them,
so ``peft.PeftModel.from_pretrained(base, path)`` loads either kind.

**Weight edits as LoRA** (:func:`save_lora`):
A delta Δ (out, in) of rank r is written as Δ = B A with B = U_r S_r (out, r) and A = V_rᵀ (r, in) from its
SVD, ``lora_alpha = r`` so PEFT's scaling is 1. The rank defaults to the delta's numerical rank (singular
values above the largest times max(out, in) times the dtype's epsilon, as ``numpy.linalg.matrix_rank``), so the
export is exact to the weights' own precision whatever made the delta: a one-pass closed-form edit
of N facts has rank <= N, but several rounds, or FT's gradient steps, give more. At the layer width the
factorisation is simply a dense one. ``peft.PeftModel.from_pretrained(base, path)`` then reproduces the edited
model. A smaller ``rank`` asked for explicitly is honoured with a warning that says how much of the edit it drops.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from memoe.errors import AdapterError, ConfigError, MissingFileError
from memoe.io import load_tensors, save_tensors, write_json
from memoe.models.arch import model_parts

_FLAGS = "_memoe_lora_flags"  # model.__dict__ key: requires_grad of every parameter before inject_lora
_PEFT_CONFIG = "peft_config"  # the attribute peft's injection sets on the model


def inject_lora(model: torch.nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, LoraLayer]:
    """Wrap ``config.target_modules`` of ``model`` in LoRA layers (B = 0: the model is unchanged until trained or
    given ``tensors``, peft-named as :func:`lora_tensors` returns them); returns module name -> LoRA layer."""
    if lora_layers(model):
        raise AdapterError("this model already has LoRA layers attached; remove them first (remove_lora)")
    if _PEFT_CONFIG in model.__dict__:
        raise AdapterError("this model carries a peft_config already (a PEFT model?); give memoe the plain base model")
    model.__dict__[_FLAGS] = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: target modules not found
        model.__dict__.pop(_FLAGS)
        model.__dict__.pop(_PEFT_CONFIG, None)
        raise ConfigError(f"LoRA target_modules {sorted(config.target_modules)}: {e}") from None
    layers = lora_layers(model)
    if tensors is not None:
        own = lora_tensors(model)
        if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
            remove_lora(model)
            raise AdapterError(f"LoRA weights do not fit this model: {len(tensors)} tensors for {len(own)} LoRA matrices "
                               f"(first expected: {next(iter(own), None)})")
        with torch.no_grad():
            for name, layer in layers.items():
                for part in ("lora_A", "lora_B"):
                    getattr(layer, part)["default"].weight.copy_(tensors[f"base_model.model.{name}.{part}.weight"])
    return layers


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Module name -> LoRA layer, for every LoRA-wrapped module of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The attached LoRA's matrices under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
    return {f"base_model.model.{n}.{part}.weight": getattr(m, part)["default"].weight.detach()
            for n, m in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def remove_lora(model: torch.nn.Module) -> None:
    """Put back every module a LoRA layer wraps and the parameters' ``requires_grad`` flags: the model as it was."""
    for name in sorted(lora_layers(model), key=len, reverse=True):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(name).get_base_layer())
    model.__dict__.pop(_PEFT_CONFIG, None)
    flags = model.__dict__.pop(_FLAGS, {})
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def save_peft(path: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT adapter folder: ``adapter_model.safetensors`` then ``adapter_config.json``, each written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "adapter_model.safetensors", {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                 metadata={"format": "pt"})
    cfg_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    write_json(path / "adapter_config.json", cfg_dict)
    return path


def read_peft(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT LoRA folder written by :func:`save_peft` or by peft itself."""
    path = Path(path)
    cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise MissingFileError(f"{path}: not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if data.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {data.get('peft_type')!r}, expected 'LORA'")
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in data.items() if k in known}), load_tensors(weights)


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
    return save_peft(path, cfg, tensors)


def load_lora(base, path: str | os.PathLike):
    """``peft.PeftModel.from_pretrained(base, path)``: the edit on top of an unedited base.
    ``.unload()`` on the result gives the base back untouched."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path))
