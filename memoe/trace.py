"""Causal tracing (Meng et al. 2022): where does a model keep a fact?

Corrupt the subject's token embeddings with Gaussian noise, then restore one clean state (a layer's hidden
state or its MLP output, at one token) and measure how much of the correct answer's probability comes back.
That recovery, averaged over facts, is the *indirect effect* of the state. Editors that write at one token
position (ROME, MEMIT, EMMET, CoachHooK) should edit where the MLP effect peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from memoe import nethook
from memoe.models.arch import model_parts
from memoe.evaluation.scoring import model_device
from memoe.tokens import fact_position, subject_span

POSITIONS = ("subject_first", "subject_last", "prompt_last")
KINDS = ("hidden", "mlp")


@dataclass
class TraceResult:
    """Mean restored probability minus corrupted probability, per kind, position and layer."""

    num_layers: int
    n_facts: int
    p_clean: float
    p_corrupt: float
    effects: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def peak(self, kind: str = "mlp") -> dict:
        """The (position, layer) of the largest indirect effect for ``kind``."""
        best = max(((pos, l, v) for pos, vals in self.effects[kind].items() for l, v in enumerate(vals)), key=lambda x: x[2])
        return {"kind": kind, "position": best[0], "layer": best[1], "effect": best[2]}

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_mlp": self.peak("mlp"), "peak_hidden": self.peak("hidden")}


@torch.no_grad()
def trace_fact(model: nn.Module, tok, template: str, subject: str, target: str, noise_std: float,
               samples: int = 5, generator: torch.Generator | None = None) -> tuple[float, float, dict]:
    """Trace one fact. Returns (clean prob, corrupted prob, {kind: {position: [restored prob per layer]}})."""
    parts = model_parts(model)
    L, device = parts.num_layers, model_device(model)
    text = template.replace("{}", subject)
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]], device=device)
    answer = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    s0, s1 = subject_span(tok, template, subject)
    pos = {p: fact_position(tok, template, subject, p) for p in POSITIONS}
    names = {"hidden": [parts.name("layers") + f".{l}" for l in range(L)], "mlp": [parts.name("mlp", l) for l in range(L)]}

    with nethook.capture(model, names["hidden"] + names["mlp"]) as clean:
        p_clean = torch.softmax(model(ids).logits[0, -1].float(), -1)[answer].item()

    # Row 0 of each sample is the corrupted run; then one row per (kind, position, layer) restoration.
    plan = [(k, p, l) for k in KINDS for p in POSITIONS for l in range(L)]
    rows = 1 + len(plan)
    batch = ids.repeat(samples * rows, 1)
    H = clean[names["hidden"][0]].shape[-1]
    noise = torch.randn(samples, s1 - s0, H, generator=generator, device="cpu").to(device) * noise_std

    def corrupt(module, args, output):
        out = output.clone()
        out[:, s0:s1] += noise.repeat_interleave(rows, dim=0).to(out.dtype)
        return out

    def restorer(kind: str, layer: int):
        targets = [(i, pos[p]) for i, (k, p, l) in enumerate(plan, start=1) if k == kind and l == layer]

        def fn(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            src = clean[names[kind][layer]][0]
            for r, t in targets:
                h[r::rows, t] = src[t]
            return h

        return fn

    edits = {names[k][l]: restorer(k, l) for k in KINDS for l in range(L)}
    with nethook.hooks(model, forward={parts.name("embed"): corrupt}), nethook.patch(model, edits):
        probs = torch.softmax(model(batch).logits[:, -1].float(), -1)[:, answer].view(samples, rows).mean(0)
    restored: dict = {k: {p: [0.0] * L for p in POSITIONS} for k in KINDS}
    for i, (k, p, l) in enumerate(plan, start=1):
        restored[k][p][l] = probs[i].item()
    return p_clean, probs[0].item(), restored


def causal_trace(model: nn.Module, tok, facts: list[tuple[str, str, str]], samples: int = 5,
                 noise_scale: float = 3.0, seed: int = 0, progress: bool = True) -> TraceResult:
    """Average indirect effects over ``facts``, each a (prompt template with ``{}``, subject, target) triple.

    ``noise_scale`` times the standard deviation of the embedding table is the corruption noise (ROME uses 3).
    """
    parts = model_parts(model)
    emb = parts.module("embed").weight
    noise_std = noise_scale * emb.float().std().item()
    g = torch.Generator().manual_seed(seed)
    L = parts.num_layers
    sums = {k: {p: [0.0] * L for p in POSITIONS} for k in KINDS}
    pc = pk = 0.0
    for template, subject, target in tqdm(facts, desc="causal trace", disable=not progress, leave=False):
        if "{}" not in template:
            template = template.replace(subject, "{}", 1)
        c, k, restored = trace_fact(model, tok, template, subject, target, noise_std, samples, g)
        pc, pk = pc + c, pk + k
        for kind in KINDS:
            for p in POSITIONS:
                for l in range(L):
                    sums[kind][p][l] += restored[kind][p][l] - k
    n = max(1, len(facts))
    effects = {kind: {p: [v / n for v in sums[kind][p]] for p in POSITIONS} for kind in KINDS}
    return TraceResult(num_layers=L, n_facts=len(facts), p_clean=pc / n, p_corrupt=pk / n, effects=effects)


def plot_trace(result: TraceResult, path: str, title: str = "causal trace") -> None:
    """Indirect effect per layer, one panel per kind, one line per token position (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memoe.io import atomic_path

    fig, axes = plt.subplots(1, len(KINDS), figsize=(5 * len(KINDS), 3.5), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for p, vals in result.effects[kind].items():
            ax.plot(range(result.num_layers), vals, marker="o", label=p.replace("_", " "))
        ax.set_title(f"restore {kind} state")
        ax.set_xlabel("layer")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("indirect effect on P(answer)")
    axes[-1].legend()
    fig.suptitle(f"{title} (p clean {result.p_clean:.2f}, corrupted {result.p_corrupt:.2f}, {result.n_facts} facts)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
