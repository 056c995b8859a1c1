"""Context prefixes: the text an edit must hold after.

Editors average keys and targets over prefixed prompts (closed forms) or train under them (bypass adapters),
so that an edit made on "{subject} was employed in" also holds after whatever text comes before it. Two
sources, used together:

- fixed sentences (``context_prefixes``; :data:`DEFAULT_PREFIXES` by default);
- sentences the model writes itself (``generated_prefixes``), as ROME/MEMIT's context templates: top-5
  sampling from a few seed words, seeded, so the same model gives the same prefixes. They are text the model
  finds natural, which is what comes before a prompt in its own world (see the README's "Context prefixes"
  for what they did on the CounterFact testbed).

Editors generate once per model, from the model as it is at their first edit (a later edit of a sequence
reuses them: the same keys everywhere, the r-ROME point).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch

from memoe.config import bounds

#: Short neutral sentences put before a prompt.
DEFAULT_PREFIXES = ["The market was busy.", "It rained all day.", "A new bridge opened.", "Tea is served at four."]
#: Words the generated prefixes start from (MEMIT's).
SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class ContextOptions:
    """Which prefixes an editor puts before each prompt (the bare prompt is always included)."""

    context_prefixes: list[str] = field(default_factory=lambda: list(DEFAULT_PREFIXES))
    """Fixed prefixes."""
    generated_prefixes: int = field(default=0, metadata=bounds(0, 1000))
    """Prefixes the model writes itself (top-5 sampling from seed words, as ROME/MEMIT), added to the fixed ones."""
    generated_prefix_tokens: int = field(default=8, metadata=bounds(1, 256))
    """Tokens generated for each of them."""


def prefixed(prompt: str, prefixes: list[str]) -> list[str]:
    """The bare prompt template followed by each prefix + " " + template."""
    return [prompt] + [f"{p} {prompt}" for p in prefixes]


@torch.no_grad()
def generate_prefixes(model, tok, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` sentences of ``length`` sampled tokens (top 5) from the seed words, deterministic under ``seed``.

    Braces are dropped (a prefix goes in front of a "{}" template) and a full stop closes each one.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    per_seed = [n // len(SEED_WORDS) + (i < n % len(SEED_WORDS)) for i in range(len(SEED_WORDS))]
    out: list[str] = []
    for word, k in zip(SEED_WORDS, per_seed):
        if k == 0:
            continue
        ids = torch.tensor([tok(word, add_special_tokens=True)["input_ids"]] * k, device=device)  # (k, T)
        for _ in range(length):  # no KV cache: prefixes are a few tokens, made once per model
            logits = model(input_ids=ids).logits[:, -1].float().cpu()  # (k, V)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1)
            pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)  # (k, 1)
            ids = torch.cat([ids, top.indices.gather(1, pick).to(device)], dim=1)
        for row in ids:
            text = tok.decode(row, skip_special_tokens=True).replace("{", "").replace("}", "").strip()
            out.append(text if text.endswith((".", "!", "?")) else text + ".")
    return out


class PrefixMemo:
    """The prefixes an editor uses, generated once per model (held weakly: a dropped model frees them)."""

    def __init__(self):
        self._memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def resolve(self, model, tok, opts: ContextOptions) -> list[str]:
        """The fixed prefixes plus the model's generated ones."""
        if opts.generated_prefixes == 0:
            return list(opts.context_prefixes)
        key = (opts.generated_prefixes, opts.generated_prefix_tokens)
        per_model = self._memo.setdefault(model, {})
        if key not in per_model:
            per_model[key] = generate_prefixes(model, tok, *key)
        return list(opts.context_prefixes) + per_model[key]

    def apply(self, model, tok, opts):
        """A copy of the config ``opts`` whose ``context_prefixes`` are resolved (and nothing left to generate)."""
        return dataclasses.replace(opts, context_prefixes=self.resolve(model, tok, opts), generated_prefixes=0)
