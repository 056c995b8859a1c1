"""Ground floor of every forward pass memoe makes: padding, encoding (prompt, target) pairs, and the target NLL.

Editors, training, tracing, scoring and the testbed all batch prompts the same way, so the conventions live
here once: prompts carry the tokenizer's BOS, targets are encoded as ``" " + target`` without special tokens,
rows are right-padded, and the LM head runs only at the positions that predict target tokens (cheap with a
128k vocabulary).
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from memoe import nethook
from memoe.errors import DataError


def encode_pairs(tok, prompts: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (with the tokenizer's BOS) and of ``" " + target`` (no special tokens)."""
    p_ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
    t_ids = tok([" " + t for t in targets], add_special_tokens=False)["input_ids"]
    for t, ids in zip(targets, t_ids):
        if not ids:
            raise DataError(f"target {t!r} tokenises to nothing")
    return p_ids, t_ids


def target_index(p_ids: list[list[int]], t_ids: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Where each target token is predicted in the batch of ``prompt + target`` rows: (row, column, label)
    for every target token, flattened; position j predicts token j + 1."""
    rows = [b for b, t in enumerate(t_ids) for _ in t]
    cols = [len(p) - 1 + j for p, t in zip(p_ids, t_ids) for j in range(len(t))]
    labels = [x for t in t_ids for x in t]
    return rows, cols, labels


def pad_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a (B, T) id tensor and its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def warn_if_too_long(model: nn.Module, seqs: list[list[int]], what: str) -> None:
    """Warn when sequences exceed the model's positions: what a model computes past them is not meaningful."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    long = [len(s) for s in seqs if len(s) > limit]
    if long:
        warnings.warn(f"{len(long)} of {len(seqs)} {what} are longer than the model's {limit} positions (longest "
                      f"{max(long)} tokens): their scores and edits are not meaningful; shorten or filter them", stacklevel=3)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def read_at(model: nn.Module, seqs: list[list[int]], positions: list[int], names: list[str], inputs: bool,
            pad_id: int) -> dict[str, torch.Tensor]:
    """For each named module, (N, D) its input (``inputs=True``) or output at ``positions[i]`` of row ``seqs[i]``, from
    one right-padded pass of the base that stops once every named module has run."""
    ids, mask = pad_batch(seqs, pad_id, model_device(model))
    with nethook.capture(model, names, inputs=inputs, stop=True) as store:  # nothing above the modules runs
        model.base_model(input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(seqs), device=ids.device)
    pos = torch.tensor(positions, device=ids.device)
    return {name: store[name][rows, pos] for name in names}


_PROMPT_CONTEXT = "_memoe_prompt_context"  # model.__dict__ key: a function prompts -> prompts, or absent


def set_prompt_context(model: nn.Module, fn) -> None:
    """Make every prompt memoe scores or generates from on ``model`` pass through ``fn`` (list of prompts -> list of
    prompts) first: how an in-context editor (LTE) puts its retrieved edits before a query. ``None`` removes it."""
    if fn is None:
        model.__dict__.pop(_PROMPT_CONTEXT, None)
    else:
        model.__dict__[_PROMPT_CONTEXT] = fn


def in_context(model: nn.Module, prompts: list[str]) -> list[str]:
    """``prompts`` as the model is queried with them: through its prompt context if one is set, else unchanged."""
    fn = model.__dict__.get(_PROMPT_CONTEXT)
    if fn is None or not prompts:
        return list(prompts)
    out = list(fn(list(prompts)))
    if len(out) != len(prompts):
        raise ValueError(f"prompt context returned {len(out)} prompts for {len(prompts)}")
    return out


def final_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm, without computing logits for every position."""
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


def target_nll(model: nn.Module, tok, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """(B,) differentiable mean token NLL of each target after its prompt, in one padded forward.

    The training-side twin of :func:`memoe.evaluation.scoring.score_pairs`: editors optimise it (FT, target values, adapters).
    """
    p_ids, t_ids = encode_pairs(tok, prompts, targets)
    warn_if_too_long(model, [p + t for p, t in zip(p_ids, t_ids)], "edit prompts (with their targets)")
    device, head = model_device(model), model.get_output_embeddings()
    ids, mask = pad_batch([p + t for p, t in zip(p_ids, t_ids)], tok.pad_token_id, device)
    hidden = final_hidden(model, ids, mask)
    rows, cols, labels = target_index(p_ids, t_ids)
    tok_nll = token_nll(head, hidden, rows, cols, torch.tensor(labels, device=device))
    return row_mean(tok_nll, torch.tensor(rows, device=device), len(t_ids))


def token_nll(head: nn.Module, hidden: torch.Tensor, rows, cols, labels: torch.Tensor) -> torch.Tensor:
    """(n_tokens,) NLL of each target token; ``hidden`` (B, T, H), the LM head applied only at (rows, cols)."""
    return F.cross_entropy(head(hidden[rows, cols]).float(), labels, reduction="none")


def row_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) mean of ``values`` (n,) grouped by ``rows`` (n,): per-token NLLs -> each row's mean NLL,
    or per-row NLLs -> each request's mean over its prompts."""
    counts = torch.bincount(rows, minlength=n_rows).to(values.dtype)
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values) / counts


def cache_keyword(model: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by (``cache`` in transformers 5, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output) -> object:
    """The KV cache a causal LM's forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]
