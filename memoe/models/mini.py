"""Llama-3's architecture: shrunk (tests of the code path a real Llama-3-8B takes) or at full size with random
weights (GPU speed and memory figures without downloading the model)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from memoe.errors import UnknownNameError

#: Meta-Llama-3-8B's config.json, the fields that shape the code path (sizes aside).
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
)
#: Llama-3.1's "llama3" RoPE scaling (Llama-3-8B itself uses plain RoPE with theta 5e5).
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


def llama3_mini_config(vocab_size: int = 512, hidden_size: int = 64, layers: int = 4) -> LlamaConfig:
    """A randomly initialisable Llama-3: grouped-query attention (4:1), llama3 RoPE scaling, untied head."""
    return LlamaConfig(
        **{**LLAMA3_8B, "hidden_size": hidden_size, "intermediate_size": int(hidden_size * 3.5),
           "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": vocab_size,
           "max_position_embeddings": 131072,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        rope_parameters=dict(LLAMA3_ROPE),
    )


def llama3_8b_config() -> LlamaConfig:
    """Meta-Llama-3-8B's shapes (plain RoPE, theta 5e5): for speed and memory figures without the weights."""
    return LlamaConfig(**LLAMA3_8B, rope_parameters=dict(rope_type="default", rope_theta=500000.0))


#: ``random:NAME`` models of ``bench/bench_editors.py``: real Llama-3 code paths, random weights.
SHAPES = {
    "llama3-8b": llama3_8b_config,
    # the 8B vocabulary and enough layers for the Llama-3 editor configs (layers 1-8): a smoke test of that path
    "llama3-mini": lambda: llama3_mini_config(vocab_size=LLAMA3_8B["vocab_size"], hidden_size=64, layers=10),
}


def random_model(shape: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """A Llama-3 of ``shape`` (a :data:`SHAPES` key) with random weights, built on ``device`` directly in
    ``dtype`` (an 8B model never exists in float32 or on the CPU); eval mode, parameters frozen."""
    from transformers import LlamaForCausalLM

    if shape not in SHAPES:
        raise UnknownNameError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    config = SHAPES[shape]()
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.name_or_path = f"random:{shape}"
    return model.eval().requires_grad_(False)
