"""One table per architecture naming the modules editors need, and model loading.

Editors never spell out module paths: they ask :func:`model_parts` for "the down-projection of layer 3"
and get it, whatever the architecture. Adding an architecture is one :class:`ArchSpec` entry in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memoe.errors import ConfigError, LayerError, UnknownNameError
from memoe.io import stable_hash


@dataclass(frozen=True)
class ArchSpec:
    """Module paths for one architecture; ``{}`` stands for the layer index."""

    layers: str
    """The list of decoder blocks."""
    mlp: str
    """One block's feed-forward module."""
    down_proj: str
    """The MLP's output projection: the matrix W0 that closed-form editors change."""
    attn: str
    """One block's attention module."""
    embed: str
    """The token embedding."""
    final_norm: str
    """The norm before the LM head."""
    lm_head: str
    """The output projection to the vocabulary."""
    down_proj_transposed: bool = False
    """True when the down-projection stores its weight as (in, out) (GPT-2's ``Conv1D``)."""


_LLAMA_LIKE = ArchSpec(
    layers="model.layers", mlp="model.layers.{}.mlp", down_proj="model.layers.{}.mlp.down_proj",
    attn="model.layers.{}.self_attn", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
)

#: ``config.model_type`` -> module paths. Llama-3 is ``llama``.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": ArchSpec(
        layers="transformer.h", mlp="transformer.h.{}.mlp", down_proj="transformer.h.{}.mlp.c_proj",
        attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
        down_proj_transposed=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h", mlp="transformer.h.{}.mlp", down_proj="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
    ),
}


UnknownArchitectureError = UnknownNameError


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"memoe has no module table for model_type={model_type!r} ({type(model).__name__}). Known: "
            f"{sorted(ARCHITECTURES)}. Add one with memoe.models.register_architecture({model_type!r}, ArchSpec("
            "layers=..., mlp=..., down_proj=..., attn=..., embed=..., final_norm=..., lm_head=...)), "
            "using the module names printed by print(model)."
        )
    return ARCHITECTURES[model_type]


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach memoe a new architecture (see :class:`ArchSpec` for the fields)."""
    ARCHITECTURES[model_type] = spec


class ModelParts:
    """Resolved modules of one model, by the names of :class:`ArchSpec`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.spec = arch_spec(model)
        self.num_layers = len(self.get(self.spec.layers))

    def get(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise UnknownArchitectureError(f"module {path!r} not found in {type(self.model).__name__}: {e}") from None

    def check_layer(self, layer: int) -> int:
        if not -self.num_layers <= layer < self.num_layers:
            raise LayerError(f"layer {layer} out of range: the model has {self.num_layers} layers (0..{self.num_layers - 1})")
        return layer % self.num_layers

    def name(self, kind: str, layer: int | None = None) -> str:
        """Module path of ``kind`` (an :class:`ArchSpec` field) at ``layer``."""
        path = getattr(self.spec, kind)
        return path.format(self.check_layer(layer)) if "{}" in path else path

    def module(self, kind: str, layer: int | None = None) -> nn.Module:
        return self.get(self.name(kind, layer))

    def layer(self, i: int) -> nn.Module:
        return self.get(self.spec.layers)[self.check_layer(i)]

    def down_proj_weight(self, layer: int) -> torch.Tensor:
        """W0 of ``layer`` as a view shaped (out=hidden, in=intermediate), whatever the storage."""
        w = self.module("down_proj", layer).weight
        return w.T if self.spec.down_proj_transposed else w


def model_parts(model: nn.Module) -> ModelParts:
    return ModelParts(model)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture config and a sample of the weights: keys caches and adapters."""
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    h = 0.0
    with torch.no_grad():
        for i, (_name, p) in enumerate(sorted(model.named_parameters())):
            flat = p.detach().reshape(-1)
            h += float(flat[:: max(1, flat.numel() // 64)].double().sum()) * (i + 1)
    return stable_hash({"config": cfg, "weights": f"{h:.10e}"})
