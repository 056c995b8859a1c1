"""Adapters: edits kept beside a frozen base model.

- :mod:`memoe.adapters.lora`: weight deltas of closed-form editors exported as PEFT LoRA adapters;
- :mod:`memoe.adapters.bypass`: bypass adapters attached with hooks (``attach`` and ``load_adapter`` for saved ones are
  in :mod:`memoe.editors`, whose registry knows every method);
- :mod:`memoe.adapters.moe`: MEMoE; :mod:`memoe.adapters.anchors`: knowledge-anchor detection;
- :mod:`memoe.adapters.hooks`: CoachHooK's hook layers.
"""

from memoe.adapters.bypass import AdapterError, BypassAdapter, attached, detach, read_adapter
from memoe.adapters.hooks import CoachHooKAdapter, HookConfig
from memoe.adapters.lora import factorize, load_lora, save_lora
from memoe.adapters.moe import MEMoEAdapter, MEMoEConfig

__all__ = [
    "AdapterError", "BypassAdapter", "CoachHooKAdapter", "HookConfig", "MEMoEAdapter", "MEMoEConfig", "attached", "detach",
    "factorize", "load_lora", "read_adapter", "save_lora",
]
