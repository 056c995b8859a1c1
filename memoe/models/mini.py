"""Llama-3's architecture with its shapes shrunk, for tests of the code path a real Llama-3-8B takes."""

from __future__ import annotations

from transformers import LlamaConfig

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
           "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 131072,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        rope_parameters=dict(LLAMA3_ROPE),
    )
