"""Knowledge neurons (Dai et al. 2022): which MLP neurons hold a fact, found by integrated gradients.

A neuron of layer l is one entry of the MLP's intermediate activation, the down-projection's input, at the
prompt's last token. Its attribution to the answer is its activation times the average gradient of
P(answer) along the straight path that scales the layer's activations from 0 to their value, as an m-step
Riemann sum (the paper's m = 20, its right-point rule):

    Attr_i = a_i / m * sum_{k=1..m} dP(k/m * a) / da_i

All neurons of a layer are scaled together, as in the authors' and EasyEdit's code, so a layer's
attributions add up to P(a) - P(0) up to the Riemann error (completeness; the tests check it). Then the
paper's refinement: per prompt keep the neurons above ``threshold`` times the largest attribution of any
layer (0.2), and keep those found for at least a fraction ``share`` of the fact's prompts.

Speed: scaling an activation at the last token changes nothing at the earlier positions (causal attention),
so the prompt but its last token runs once, with a KV cache, and every IG step is a one-token forward. The m
steps of a layer are m rows of one batch, several layers share a batch (``max_rows``), and gradients are taken
with respect to the scaled activations only (never the weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from memoe import nethook
from memoe.batching import cache_keyword, cache_of, model_device
from memoe.config import bounds
from memoe.errors import DataError
from memoe.io import atomic_path
from memoe.models.arch import model_parts


@dataclass
class KNOptions:
    """How knowledge neurons are found (the paper's settings by default)."""

    steps: int = field(default=20, metadata=bounds(1, 1000))
    """Riemann steps m of the integrated gradients (paper: 20)."""
    threshold: float = field(default=0.2, metadata=bounds(0.0, 1.0))
    """Per prompt, keep neurons whose attribution exceeds this fraction of the largest one, over all layers (paper: 0.2)."""
    share: float = field(default=0.5, metadata=bounds(0.0, 1.0))
    """Keep neurons found for at least this fraction of the fact's prompts (the refinement; one prompt keeps all)."""
    max_rows: int = field(default=320, metadata=bounds(1))
    """Rows (layers x steps) of one batched IG forward: bounds memory, not results."""


class Attribution(NamedTuple):
    """Integrated gradients of one prompt: (layers, I) attributions and activations, and P(answer) unedited."""

    scores: torch.Tensor
    p_answer: float
    activations: torch.Tensor


@dataclass
class FactNeurons:
    """The knowledge neurons of one fact: ``(layer, neuron index, attribution, activation)``, strongest first
    (attribution and activation averaged over the prompts that found the neuron)."""

    neurons: list[tuple[int, int, float, float]]
    prompts: int
    """Prompts the refinement voted over."""
    coarse: list[int]
    """Neurons above the threshold, per prompt."""
    p_answer: list[float]
    """P(answer) at each prompt's last token, unedited."""

    def per_layer(self, num_layers: int) -> list[int]:
        counts = [0] * num_layers
        for layer, *_ in self.neurons:
            counts[layer] += 1
        return counts


def integrated_gradients(model: nn.Module, ids: list[int], answer: int, layers: list[int], steps: int = 20,
                         max_rows: int = 320) -> Attribution:
    """Attributions (len(layers), I) of every MLP neuron of ``layers`` (distinct) at the last of ``ids`` (token ids,
    BOS included) to P(``answer`` is the next token); that probability, unedited; and the neurons' activations."""
    if not ids:
        raise DataError("integrated gradients of an empty prompt")
    parts = model_parts(model)
    layers = list(dict.fromkeys(parts.check_layer(l) for l in layers))
    names = [parts.name("down_proj", l) for l in layers]
    device, kw = model_device(model), cache_keyword(model)
    x = torch.tensor([ids], device=device)  # (1, T)

    # The prompt but its last token, once; then the last token alone, recording the clean activations a.
    with torch.no_grad():
        past = cache_of(model(input_ids=x[:, :-1], use_cache=True)) if len(ids) > 1 else None
        with nethook.capture(model, names, inputs=True) as acts:
            logits = model(input_ids=x[:, -1:], **{kw: copy.deepcopy(past)}, use_cache=past is not None).logits
        p_answer = torch.softmax(logits[0, -1].float(), -1)[answer].item()
    clean = {l: acts[n][0, -1].float() for l, n in zip(layers, names)}  # layer -> (I,)
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps  # (m,) k/m, k = 1..m

    scores = {}
    per_pass = max(1, max_rows // steps)
    for start in range(0, len(layers), per_pass):
        chunk = layers[start: start + per_pass]
        B = len(chunk) * steps
        # Rows [j*m, (j+1)*m) scale layer chunk[j]: a leaf per layer, (m, I), so its gradient is that layer's.
        scaled = {l: (alphas[:, None] * clean[l]).requires_grad_() for l in chunk}

        def put(leaf: torch.Tensor, row0: int):
            def pre(module, args):
                h = args[0]  # (B, 1, I)
                s = leaf.to(h.dtype)[:, None]  # (m, 1, I)
                return (torch.cat([h[:row0], s, h[row0 + steps:]], 0), *args[1:])

            return pre

        cache = None
        if past is not None:
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(B)
        hooks = {parts.name("down_proj", l): put(scaled[l], j * steps) for j, l in enumerate(chunk)}
        with torch.enable_grad(), nethook.hooks(model, pre=hooks):
            logits = model(input_ids=x[:, -1:].expand(B, 1), **{kw: cache}, use_cache=cache is not None).logits
            prob = torch.softmax(logits[:, -1].float(), -1)[:, answer]  # (B,)
            grads = torch.autograd.grad(prob.sum(), [scaled[l] for l in chunk])
        for l, g in zip(chunk, grads):
            scores[l] = clean[l] * g.mean(0)  # (I,)
    return Attribution(torch.stack([scores[l] for l in layers]).cpu(), p_answer, torch.stack([clean[l] for l in layers]).cpu())


def coarse_neurons(scores: torch.Tensor, layers: list[int], threshold: float) -> dict[tuple[int, int], tuple[int, int]]:
    """{(layer, neuron): (row, column) in ``scores``} of the neurons above ``threshold`` x the largest attribution
    (over all layers)."""
    top = scores.max().item()
    if top <= 0:
        return {}
    rows, cols = torch.nonzero(scores > threshold * top, as_tuple=True)
    return {(layers[r], c): (r, c) for r, c in zip(rows.tolist(), cols.tolist())}


def knowledge_neurons(model: nn.Module, tok, prompts: list[str], answer: int, layers: list[int] | None = None,
                      opts: KNOptions | None = None) -> FactNeurons:
    """The refined knowledge neurons of one fact: ``prompts`` (texts) all completed by the token ``answer``."""
    opts = opts or KNOptions()
    parts = model_parts(model)
    layers = list(range(parts.num_layers)) if not layers else [parts.check_layer(l) for l in layers]
    votes: dict[tuple[int, int], list[tuple[float, float]]] = {}  # neuron -> (attribution, activation) per prompt
    coarse, probs = [], []
    for text in prompts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        attr = integrated_gradients(model, ids, answer, layers, opts.steps, opts.max_rows)
        found = coarse_neurons(attr.scores, layers, opts.threshold)
        coarse.append(len(found))
        probs.append(attr.p_answer)
        for key, (r, c) in found.items():
            votes.setdefault(key, []).append((attr.scores[r, c].item(), attr.activations[r, c].item()))
    need = opts.share * len(prompts)
    mean = lambda xs: sum(xs) / len(xs)
    kept = [(l, i, mean([s for s, _ in v]), mean([a for _, a in v])) for (l, i), v in votes.items() if len(v) >= need]
    kept.sort(key=lambda n: -n[2])
    return FactNeurons(neurons=kept, prompts=len(prompts), coarse=coarse, p_answer=probs)


def answer_token(tok, target: str) -> int:
    """The first token of ``" " + target``: the token whose probability is attributed (and edited)."""
    ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"target {target!r} tokenises to nothing")
    return ids[0]


def summarise(facts: list[FactNeurons], num_layers: int) -> dict:
    """Where the neurons of many facts lie: count per layer, the layer with most, the mean layer, neurons per fact."""
    per_layer = [0] * num_layers
    for f in facts:
        for layer, n in enumerate(f.per_layer(num_layers)):
            per_layer[layer] += n
    total = sum(per_layer)
    return {
        "facts": len(facts), "neurons": total, "neurons_per_fact": total / max(1, len(facts)),
        "facts_without_neurons": sum(not f.neurons for f in facts), "per_layer": per_layer,
        "peak_layer": max(range(num_layers), key=per_layer.__getitem__) if total else None,
        "mean_layer": sum(l * n for l, n in enumerate(per_layer)) / total if total else None,
    }


def plot_neurons(summary: dict, path: str, title: str, trace: dict | None = None) -> None:
    """Knowledge neurons per layer (bars); with ``trace`` (a causal-trace result dict), its MLP indirect effect at
    the subject's last token on a second axis, so the two locators can be read off one figure (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    layers = range(len(summary["per_layer"]))
    ax.bar(layers, summary["per_layer"], color="tab:green", alpha=0.7, label="knowledge neurons")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"neurons ({summary['facts']} facts)")
    if trace is not None:
        effect = trace["effects"]["mlp"]["subject_last"]
        ax2 = ax.twinx()
        ax2.plot(range(len(effect)), effect, color="tab:purple", marker="o", ms=3,
                 label=f"causal trace: MLP at subject's last token (window {trace['settings'].get('window')})")
        ax2.set_ylabel("indirect effect on P(answer)")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def reference_integrated_gradients(model: nn.Module, ids: list[int], answer: int, layer: int, steps: int = 20) -> torch.Tensor:
    """(I,) the same attributions by the definition, one step at a time: the whole prompt runs for every step, no
    cache, no batching (what the reference implementations do). Slow; for checks and ``bench/bench_kn.py``."""
    name = model_parts(model).name("down_proj", layer)
    x = torch.tensor([ids], device=model_device(model))
    with torch.no_grad(), nethook.capture(model, [name], inputs=True) as seen:
        model(input_ids=x)
    a = seen[name][0, -1].float()
    total = torch.zeros_like(a)
    for k in range(1, steps + 1):
        leaf = (a * k / steps).requires_grad_()

        def pre(module, args, leaf=leaf):
            h = args[0].clone()
            h[0, -1] = leaf.to(h.dtype)
            return (h, *args[1:])

        with torch.enable_grad(), nethook.hooks(model, pre={name: pre}):
            p = torch.softmax(model(input_ids=x).logits[0, -1].float(), -1)[answer]
            total += torch.autograd.grad(p, leaf)[0]
    return (a * total / steps).cpu()
