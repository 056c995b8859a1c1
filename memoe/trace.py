"""Causal tracing, ROME's protocol (Meng et al. 2022): where does a model keep a fact?

Corrupt the subject's token embeddings with Gaussian noise (3x the standard deviation of the model's token
embeddings), then restore clean states and measure how much of the true answer's probability comes back.
That recovery, minus the corrupted probability and averaged over facts, is the *indirect effect*. As ROME:

- only facts the model knows are traced (:mod:`memoe.evaluation.known` selects them; the caller says how many
  were tried and kept);
- three kinds of state: a decoder layer's output (``hidden``, one layer), and the MLP and attention outputs
  (``mlp``, ``attn``) restored over a *window* of consecutive layers centred on each layer (ROME: 10), since
  one MLP out of 30 carries too little to see;
- every token from the subject's first to the prompt's last (tokens before the subject are never corrupted,
  so restoring them does nothing); the figure averages them into ROME's six token categories.

Speed: one fact's noise samples and all its restorations run in a few batched passes. A restoration that
starts at layer l leaves every layer below l exactly as in the corrupted run, so the decoder layers are
called one at a time (with the arguments the model itself passed them, recorded on the clean run) and each
row joins the batch at the layer where it first differs: about half the work of running every row through the
whole model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from memoe import nethook
from memoe.batching import model_device
from memoe.io import atomic_path
from memoe.models.arch import model_parts
from memoe.tokens import subject_span

KINDS = ("hidden", "mlp", "attn")
#: ROME's token categories (the rows of its averaged heat map).
CATEGORIES = ("subject_first", "subject_middle", "subject_last", "after_first", "after_further", "prompt_last")


@dataclass
class FactTrace:
    """One fact: the restored probability of the answer per kind, token (from the subject's first) and layer."""

    prompt: str
    subject: str
    target: str
    tokens: list[str]
    subject_span: tuple[int, int]
    p_clean: float
    p_corrupt: float
    restored: dict[str, list[list[float]]]
    """kind -> [token index - subject start][layer] -> P(answer) with that state (window) restored."""

    def categories(self) -> dict[str, list[int]]:
        """Token indices (relative to the subject's first token) of each of ROME's categories."""
        s0, s1 = self.subject_span
        T = len(self.tokens)
        after = list(range(s1, T - 1))
        cats = {"subject_first": [s0], "subject_middle": list(range(s0 + 1, s1 - 1)), "subject_last": [s1 - 1],
                "after_first": after[:1], "after_further": after[1:], "prompt_last": [T - 1]}
        return {c: [i - s0 for i in idx] for c, idx in cats.items()}


@dataclass
class TraceResult:
    """Indirect effects (restored minus corrupted probability) averaged over facts, per kind, token category and
    layer; every fact's numbers in ``facts``."""

    num_layers: int
    n_facts: int
    p_clean: float
    p_corrupt: float
    effects: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    """How the facts were chosen (``tried``, ``kept``, ``rule``), filled by the caller."""
    facts: list[dict] = field(default_factory=list)

    def __post_init__(self):  # read back from JSON, a missing category is null: NaN here
        self.effects = {k: {c: [math.nan if v is None else v for v in vals] for c, vals in cats.items()}
                        for k, cats in self.effects.items()}

    def peak(self, kind: str = "mlp") -> dict:
        """The (token category, layer) of the largest indirect effect for ``kind``."""
        best = max(((pos, l, v) for pos, vals in self.effects[kind].items() for l, v in enumerate(vals) if not math.isnan(v)),
                   key=lambda x: x[2])
        return {"kind": kind, "position": best[0], "layer": best[1], "effect": best[2]}

    def to_dict(self) -> dict:
        """Plain JSON: a category no fact has (a one-token subject has no middle) is ``null``, not NaN."""
        d = {**asdict(self), **{f"peak_{k}": self.peak(k) for k in self.effects}}
        d["effects"] = {k: {c: [None if math.isnan(v) else v for v in vals] for c, vals in cats.items()}
                        for k, cats in self.effects.items()}
        return d


def _window(layer: int, width: int, num_layers: int) -> range:
    """ROME's window of ``width`` layers centred on ``layer``, clipped to the model."""
    return range(max(0, layer - width // 2), min(num_layers, layer - (-width // 2)))


class _KV:
    """A stand-in for a transformers ``Cache`` handed to one decoder layer: it records the keys and values the
    layer computes (the corrupted run), or puts a fixed prefix of them before the new ones (a restoration that
    recomputes only the tokens from the restored one on)."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.prefix, self.seen = prefix, None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.prefix is not None:
            k, v = torch.cat([self.prefix[0], k], dim=-2), torch.cat([self.prefix[1], v], dim=-2)
        self.seen = (k, v)
        return k, v


def _suffix_call(args: tuple, kwargs: dict, off: int, T: int, dtype: torch.dtype, device) -> tuple[tuple, dict] | None:
    """A decoder layer's recorded arguments cut to the tokens from ``off`` on (queries ``off..T-1`` against keys
    ``0..T-1``), or None when the layer takes arguments this does not know how to cut (then every token runs)."""
    if args or "cache" not in kwargs or not isinstance(kwargs.get("position_embeddings"), tuple):
        return None
    kw = {}
    for key, value in kwargs.items():
        if key == "position_embeddings":
            kw[key] = tuple(x[..., off:, :] for x in value)
        elif key == "position_ids":
            kw[key] = value[..., off:]
        elif key == "attention_mask":
            if value is None:  # a causal mask whose rows start at token ``off``, additive (eager and SDPA take it)
                allowed = torch.ones(T - off, T, dtype=torch.bool, device=device).tril(diagonal=off)
                value = torch.zeros(T - off, T, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
            else:
                value = value[:, :, off:, :]
            kw[key] = value
        elif isinstance(value, torch.Tensor) and value.dim() and T in value.shape:
            return None
        else:
            kw[key] = value
    return (), kw


@torch.no_grad()
def trace_fact(model: nn.Module, tok, template: str, subject: str, target: str, noise_std: float, samples: int = 3,
               generator: torch.Generator | None = None, kinds: tuple[str, ...] = KINDS, window: int = 10,
               max_rows: int = 2048) -> FactTrace:
    """Trace one fact: every (kind, token from the subject on, layer) restoration, ``samples`` noise draws each.

    Restorations of token t change nothing before t, so (where the architecture's layers allow it) their rows
    compute only tokens t..T-1, with the corrupted run's keys and values for the tokens before.
    """
    parts = model_parts(model)
    L, device = parts.num_layers, model_device(model)
    layers = parts.get(parts.spec.layers)
    text = template.replace("{}", subject)
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]], device=device)  # (1, T)
    T = ids.shape[1]
    answer = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    s0, s1 = subject_span(tok, template, subject)
    layer_names = [f"{parts.name('layers')}.{l}" for l in range(L)]
    module_names = {"mlp": [parts.name("mlp", l) for l in range(L)], "attn": [parts.name("attn", l) for l in range(L)]}

    # Clean run: every layer's output, every MLP/attention output, layer 0's input, the arguments each layer got.
    calls: list[tuple[tuple, dict]] = [((), {})] * L

    def record_call(i):
        def pre(module, args, kwargs):
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return pre

    handles = [layers[i].register_forward_pre_hook(record_call(i), with_kwargs=True) for i in range(L)]
    try:
        with nethook.capture(model, layer_names + module_names["mlp"] + module_names["attn"]) as clean, \
                nethook.capture(model, layer_names[:1], inputs=True) as first:
            p_clean = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)[answer].item()
    finally:
        for h in handles:
            h.remove()
    x0 = first[layer_names[0]]  # (1, T, D)
    clean_out = [clean[n][0] for n in layer_names]  # L x (T, D)
    clean_mod = {k: [clean[n][0] for n in module_names[k]] for k in ("mlp", "attn")}
    norm, head = parts.module("final_norm"), model.get_output_embeddings()
    suffix = all(_suffix_call(a, kw, 0, T, x0.dtype, device) is not None for a, kw in calls)

    def answer_prob(h_last: torch.Tensor) -> torch.Tensor:  # (R, D) final states at the last token -> (R,)
        return torch.softmax(head(norm(h_last)).float(), -1)[:, answer]

    # Corrupted run: S noised copies of the embeddings; every layer's input (corr[i]: (S, T, D); corr[L]: the
    # output) and, where rows will reuse them, every layer's keys and values.
    noise = torch.randn(samples, s1 - s0, x0.shape[-1], generator=generator).to(device, x0.dtype) * noise_std
    corr = [x0.repeat(samples, 1, 1)]
    corr[0][:, s0:s1] += noise
    corr_kv = []
    for i in range(L):
        args, kwargs = calls[i]
        rec = _KV()
        if suffix:
            kwargs = {**kwargs, "cache": rec}
        corr.append(nethook.output_tensor(layers[i](corr[-1], *args, **kwargs)))
        corr_kv.append(rec.seen)
    p_corrupt = answer_prob(corr[L][:, -1]).mean().item()

    # Restorations, token by token: (kind, layer, sample) rows, each joining the batch at its first differing layer.
    probs = torch.empty(len(kinds), T - s0, L, samples)
    for t in range(s0, T):
        off = t if suffix else 0  # rows compute tokens off..T-1
        plan = sorted(((k, l, s) for k in range(len(kinds)) for l in range(L) for s in range(samples)),
                      key=lambda r: r[1] + 1 if kinds[r[0]] == "hidden" else _window(r[1], window, L).start)
        for c in range(0, len(plan), max_rows):
            rows = plan[c : c + max_rows]
            R = len(rows)
            joins = [l + 1 if kinds[k] == "hidden" else _window(l, window, L).start for k, l, s in rows]  # ascending
            sample_of = torch.tensor([s for _, _, s in rows], device=device)
            # Per layer and module kind: the batch rows whose module output at token t is set to the clean one.
            fix = {k: [[] for _ in range(L)] for k in ("mlp", "attn")}
            for j, (k, l, _s) in enumerate(rows):
                if kinds[k] != "hidden":
                    for i in _window(l, window, L):
                        fix[kinds[k]][i].append(j)

            def restorer(kind: str, i: int, fix=fix, t=t, off=off):  # bound now: built and used in this iteration
                rr = torch.tensor(fix[kind][i], dtype=torch.long, device=device)
                if not len(rr):
                    return None

                def fn(out: torch.Tensor) -> torch.Tensor:
                    live = rr[rr < out.shape[0]]  # rows not yet in the batch are not restored
                    out = out.clone()
                    out[live, t - off] = clean_mod[kind][i][t]
                    return out

                return fn

            edits = {module_names[k][i]: fn for k in ("mlp", "attn") for i in range(L) if (fn := restorer(k, i)) is not None}
            h = torch.empty(R, T - off, x0.shape[-1], device=device, dtype=x0.dtype)
            active = 0
            with nethook.patch(model, edits):
                for i in range(L + 1):
                    while active < R and joins[active] == i:  # a row starts from the corrupted run at its layer
                        k, l, s = rows[active]
                        h[active] = corr[i][s, off:]
                        if kinds[k] == "hidden":
                            h[active, t - off] = clean_out[l][t]
                        active += 1
                    if i == L or not active:
                        continue
                    args, kwargs = calls[i]
                    if suffix:
                        args, kwargs = _suffix_call(args, kwargs, off, T, x0.dtype, device)
                        k_all, v_all = corr_kv[i]
                        prefix = (k_all[sample_of[:active], :, :off], v_all[sample_of[:active], :, :off])
                        kwargs = {**kwargs, "cache": _KV(prefix)}
                    h[:active] = nethook.output_tensor(layers[i](h[:active], *args, **kwargs))
            p = answer_prob(h[:, -1]).cpu()
            for j, (k, l, s) in enumerate(rows):
                probs[k, t - s0, l, s] = p[j]

    grid = probs.mean(-1)  # (kinds, tokens from s0, layers)
    return FactTrace(
        prompt=text, subject=subject, target=target, tokens=tok.convert_ids_to_tokens(ids[0].tolist()),
        subject_span=(s0, s1), p_clean=p_clean, p_corrupt=p_corrupt,
        restored={k: [[float(f"{v:.6g}") for v in row] for row in grid[i].tolist()] for i, k in enumerate(kinds)},
    )


def causal_trace(model: nn.Module, tok, facts: list[tuple[str, str, str]], samples: int = 3, noise_scale: float = 3.0,
                 seed: int = 0, progress: bool = True, kinds: tuple[str, ...] = KINDS, window: int = 10) -> TraceResult:
    """Average indirect effects over ``facts``, each a (prompt template with ``{}``, subject, target) triple.

    ``noise_scale`` times the standard deviation of the embedding table is the corruption noise (ROME: 3);
    ``window``: layers restored together for the ``mlp`` and ``attn`` kinds (ROME: 10; 1 = single layers).
    """
    parts = model_parts(model)
    noise_std = noise_scale * parts.module("embed").weight.float().std().item()
    g = torch.Generator().manual_seed(seed)
    L = parts.num_layers
    traced = []
    for template, subject, target in tqdm(facts, desc="causal trace", unit="fact", disable=not progress):
        if "{}" not in template:
            template = template.replace(subject, "{}", 1)
        traced.append(trace_fact(model, tok, template, subject, target, noise_std, samples, g, kinds, window))
    effects = {k: {c: [float("nan")] * L for c in CATEGORIES} for k in kinds}
    for k in kinds:
        for c in CATEGORIES:
            per_fact = []  # each fact's mean over the category's tokens, minus its corrupted probability
            for f in traced:
                idx = f.categories()[c]
                if idx:
                    rows = torch.tensor([f.restored[k][i] for i in idx])  # (tokens, L)
                    per_fact.append(rows.mean(0) - f.p_corrupt)
            if per_fact:
                effects[k][c] = torch.stack(per_fact).mean(0).tolist()
    n = max(1, len(traced))
    return TraceResult(
        num_layers=L, n_facts=len(traced), p_clean=sum(f.p_clean for f in traced) / n,
        p_corrupt=sum(f.p_corrupt for f in traced) / n, effects=effects,
        settings={"samples": samples, "noise_scale": noise_scale, "noise_std": noise_std, "window": window,
                  "kinds": list(kinds), "seed": seed},
        facts=[asdict(f) for f in traced],
    )


def plot_trace(result: TraceResult, path: str, title: str = "causal trace") -> None:
    """ROME's figure: per kind a heat map of indirect effect over token category x layer, and beneath it the
    per-layer lines of the subject's last token and the prompt's last token (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result.effects)
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1.2, 1]})
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    for j, kind in enumerate(kinds):
        cats = [c for c in CATEGORIES if c in result.effects[kind]]
        grid = torch.tensor([result.effects[kind][c] for c in cats])
        ax = axes[0][j]
        im = ax.imshow(grid.nan_to_num(0.0).numpy(), aspect="auto", cmap=cmaps.get(kind, "viridis"), interpolation="nearest")
        ax.set_yticks(range(len(cats)), [c.replace("_", " ") for c in cats], fontsize=8)
        windowed = kind != "hidden" and result.settings.get("window", 1) > 1
        ax.set_title(f"restore {kind}" + (f" (window {result.settings.get('window')})" if windowed else ""))
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[1][j]
        for c in ("subject_first", "subject_last", "prompt_last"):
            if c in result.effects[kind]:
                ax.plot(range(result.num_layers), result.effects[kind][c], marker="o", ms=3, label=c.replace("_", " "))
        ax.set_xlabel("layer")
        ax.axhline(0, color="grey", lw=0.5)
    axes[1][0].set_ylabel("indirect effect on P(answer)")
    axes[1][-1].legend(fontsize=8)
    fig.suptitle(f"{title} (p clean {result.p_clean:.2f}, corrupted {result.p_corrupt:.2f}, {result.n_facts} facts)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
