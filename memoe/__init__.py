"""memoe: edit the factual knowledge of causal language models."""

__version__ = "0.1.0"
