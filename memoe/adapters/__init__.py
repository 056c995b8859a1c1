"""Adapters: edits kept beside a frozen base model.

- :mod:`memoe.adapters.lora`: weight deltas of closed-form editors exported as PEFT LoRA adapters;
- :mod:`memoe.adapters.bypass`: bypass adapters attached with hooks (``attach``/``detach``/``load_adapter``);
- :mod:`memoe.adapters.moe`: MEMoE; :mod:`memoe.adapters.anchors`: knowledge-anchor detection;
- :mod:`memoe.adapters.hooks`: CoachHooK's hook layers.
"""

from memoe.adapters.bypass import AdapterError, BypassAdapter, attach, attached, detach, load_adapter
from memoe.adapters.hooks import CoachHooKAdapter, HookConfig
from memoe.adapters.lora import factorize, load_lora, save_lora
from memoe.adapters.moe import MEMoEAdapter, MEMoEConfig

#: adapter_config.json "method" -> adapter class. Add a bypass method by adding a line here.
ADAPTERS: dict[str, type[BypassAdapter]] = {
    MEMoEAdapter.method: MEMoEAdapter,
    CoachHooKAdapter.method: CoachHooKAdapter,
}

__all__ = [
    "ADAPTERS", "AdapterError", "BypassAdapter", "CoachHooKAdapter", "HookConfig", "MEMoEAdapter", "MEMoEConfig", "attach", "attached", "detach",
    "factorize", "load_adapter", "load_lora", "save_lora",
]
