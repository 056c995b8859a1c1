"""Running only the part of fixed rows that a change can reach.

An optimisation that changes a model at block ``first`` and, in each row, only from the row's token ``head`` on
(a target's δ at the fact token; a bypass adapter gated off before the subject) leaves everything else as the
unchanged model computed it: the blocks below ``first`` at every token, and every block at the tokens before
``head`` (attention is causal). :class:`FrozenPrefix` keeps, from one pass of the unchanged model over the rows,

- each row's state entering block ``first``, from its head on, and
- the KV cache of the blocks from ``first`` up, at the row's tokens before its head,

and :meth:`FrozenPrefix.forward` then runs, at every step, only the blocks from ``first`` up on the tokens from
each row's head on. The rows keep their true positions and see the cached tokens through the attention mask, so
the hidden states are the whole rows' (within float rounding).
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from memoe import nethook
from memoe.batching import cache_keyword, cache_of
from memoe.models.arch import model_parts


class FrozenPrefix:
    """What the unchanged model computed for some rows, keyed by any hashable row key."""

    def __init__(self, model: nn.Module, first: int):
        self.model, self.first = model, first
        parts = model_parts(model)
        self.below = [f"{parts.name('layers')}.{l}" for l in range(first)]  # the blocks never run again
        self.state: dict[Hashable, torch.Tensor] = {}  # key -> (T_row - head, H) state entering block ``first``
        self.past: dict[Hashable, list] = {}  # key -> [(K, V) (kv_heads, head, head_dim) of each block from ``first``]
        self.as_tuple = False  # whether the blocks return tuples (the skipped ones must answer in kind)

    def record(self, **inputs) -> tuple[object, torch.Tensor | None]:
        """One pass of the unchanged model over padded rows (``base_model`` keyword arguments): its output (with
        the KV cache) and the (B, T, H) state entering block ``first`` (None when ``first`` is 0: rows then start
        from their token ids)."""
        if not self.below:
            return self.model.base_model(**inputs, use_cache=True), None
        last = self.below[-1]
        kinds: list[bool] = []
        record_kind = lambda module, args, output: kinds.append(isinstance(output, tuple))
        with nethook.capture(self.model, [last]) as store, nethook.hooks(self.model, {last: record_kind}):
            out = self.model.base_model(**inputs, use_cache=True)
        self.as_tuple = kinds[0]
        return out, store[last]

    def keep(self, key: Hashable, out, state: torch.Tensor | None, row: int, head: int, length: int) -> None:
        """Keep row ``row`` of a :meth:`record` pass under ``key``: its tokens before ``head`` as cache, its state
        on tokens ``head .. length - 1`` (``length``: the row without its padding)."""
        if state is not None:
            self.state[key] = state[row, head:length].clone()
        self.past[key] = [(c.keys[row, :, :head].clone(), c.values[row, :, :head].clone())
                          for c in cache_of(out).layers[self.first :]]

    def padded_state(self, keys: list[Hashable], width: int) -> torch.Tensor:
        """(B, width, H) the kept states of ``keys``, right-padded (or cut) to ``width`` as their id rows."""
        rows = [self.state[k][:width] for k in keys]
        return torch.stack([F.pad(h, (0, 0, 0, width - len(h))) for h in rows])

    def forward(self, keys: list[Hashable], ids: torch.Tensor, mask: torch.Tensor, heads: list[int],
                edit: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``base_model``'s output for rows ``keys`` given from their heads on: ``ids``/``mask`` (B, T) right-padded
        tails, ``heads`` (B,) the tokens each row leaves out. ``edit`` may change the (B, T, H) state entering block
        ``first`` (when ``first`` > 0) before the blocks from ``first`` up read it."""
        dev, width = ids.device, max(heads)
        if width == 0 and not self.below:  # nothing cached, nothing skipped: the plain forward
            return self.model.base_model(input_ids=ids, attention_mask=mask)
        left_pad = lambda t: F.pad(t, (0, 0, width - t.shape[1], 0))  # (kv, head, hd) -> (kv, width, hd)
        blank = torch.zeros(1, 1, 1, 1, device=dev).expand(len(keys), 1, width, 1)
        data = [(blank, blank)] * self.first  # placeholders: the skipped blocks' entries only give the cache its length
        for i in range(len(self.past[keys[0]])):
            data.append(tuple(torch.stack([left_pad(self.past[k][i][j]) for k in keys]) for j in (0, 1)))
        h = torch.tensor(heads, device=dev)
        head_mask = (torch.arange(width, device=dev) >= width - h[:, None]).to(mask.dtype)  # (B, width)
        inputs = dict(input_ids=ids, attention_mask=torch.cat([head_mask, mask], 1), use_cache=True,
                      position_ids=h[:, None] + torch.arange(ids.shape[1], device=dev),
                      **{cache_keyword(self.model.base_model): DynamicCache(ddp_cache_data=data)})
        if not self.below:
            return self.model.base_model(**inputs)
        state = lambda: (edit or (lambda s: s))(self.padded_state(keys, ids.shape[1]))
        with nethook.start_after(self.model, self.below, state, self.as_tuple):
            return self.model.base_model(**inputs)
