"""Adapters: edits saved beside a frozen base model (PEFT LoRA for weight edits)."""

from memoe.adapters.lora import factorize, load_lora, save_lora

__all__ = ["factorize", "load_lora", "save_lora"]
