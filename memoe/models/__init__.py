"""Model loading and the per-architecture module table."""

from memoe.models.arch import (
    ARCHITECTURES,
    ArchSpec,
    ModelParts,
    UnknownArchitectureError,
    default_device,
    load_model,
    model_fingerprint,
    model_parts,
    prepare_tokenizer,
    register_architecture,
    resolve_dtype,
)
from memoe.models.mini import llama3_mini_config

__all__ = [
    "ARCHITECTURES", "ArchSpec", "ModelParts", "UnknownArchitectureError", "default_device", "llama3_mini_config",
    "load_model", "model_fingerprint", "model_parts", "prepare_tokenizer", "register_architecture", "resolve_dtype",
]
