"""Model loading and the per-architecture module table."""

from memoe.models.arch import (
    ARCHITECTURES,
    ArchSpec,
    ModelParts,
    UnknownArchitectureError,
    default_device,
    model_fingerprint,
    model_parts,
    register_architecture,
    resolve_dtype,
)
from memoe.models.loading import PRESETS, ModelLoadError, Preset, load_model, model_key, prepare_tokenizer
from memoe.models.mini import SHAPES, llama3_8b_config, llama3_mini_config, random_model

__all__ = [
    "ARCHITECTURES", "PRESETS", "SHAPES", "ModelLoadError", "Preset", "model_key", "ArchSpec", "ModelParts", "UnknownArchitectureError",
    "default_device", "llama3_8b_config",
    "llama3_mini_config", "random_model",
    "load_model", "model_fingerprint", "model_parts", "prepare_tokenizer", "register_architecture", "resolve_dtype",
]
