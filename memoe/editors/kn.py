"""KN (Dai et al. 2022): find a fact's knowledge neurons, then rewrite their value vectors.

For each request, :func:`memoe.locate.knowledge_neurons` finds the neurons whose integrated-gradient attribution
to the *old* answer is high (on the request's prompt, and on its context-prefixed copies when the config gives
prefixes; the refinement keeps the neurons most of them share). A neuron's value vector is its column of the
down-projection, what it adds to the residual stream when it fires; the paper's update takes the old answer
out of it and puts the new one in:

    W_down[:, i] += sign(a_i) * (write_scale * e(new) - erase_scale * e(old))     (paper: 8 and 1)

with e(t) the output embedding (LM-head row) of the first token of " " + t and a_i the neuron's activation on the
prompt. The sign is ours: the paper's neurons (BERT, GELU) fire positively, a SwiGLU neuron fires with either sign
and adds a_i times its value vector, so without it half the edited neurons would write the old answer harder and
the new one away. The old answer is the request's
``target_true``, else the model's greedy next token. Requests of a batch are located on the unedited model
and their changes added up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memoe.batching import final_hidden, model_device
from memoe.config import bounds
from memoe.contexts import ContextOptions, prefixed
from memoe.data.records import EditRequest
from memoe.editors.base import EditorConfig, WeightEditor
from memoe.locate import KNOptions, answer_token, knowledge_neurons
from memoe.models.arch import model_parts


@dataclass
class KNConfig(KNOptions, ContextOptions, EditorConfig):
    layers: list[int] = field(default_factory=list)
    """Layers searched for knowledge neurons ([] = every layer)."""
    context_prefixes: list[str] = field(default_factory=list)
    """Fixed prefixes: each prefixed copy of the request's prompt votes in the refinement ([] = the prompt alone,
    as EasyEdit's KN)."""
    write_scale: float = field(default=8.0, metadata=bounds(0.0))
    """Multiple of the new answer's output embedding added to each neuron's value vector (paper: 8)."""
    erase_scale: float = field(default=1.0, metadata=bounds(0.0))
    """Multiple of the old answer's output embedding taken out of it (paper: 1)."""
    max_neurons: int = field(default=0, metadata=bounds(0))
    """Edit at most this many neurons per request, the strongest (0 = all the refinement keeps, as the paper)."""


@torch.no_grad()
def greedy_token(model, tok, text: str) -> int:
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]], device=model_device(model))
    hidden = final_hidden(model, ids, torch.ones_like(ids))  # (1, T, H): the LM head runs at the last position only
    return model.get_output_embeddings()(hidden[0, -1]).argmax().item()


class KNEditor(WeightEditor):
    name = "kn"
    summary = "knowledge neurons found by integrated gradients; their value vectors lose the old answer's output embedding and gain the new one's"
    paper = "Dai et al. 2022"
    Config = KNConfig

    def compute_deltas(self, model, tok, requests: list[EditRequest]):
        cfg: KNConfig = self.prefixes.apply(model, tok, self.config)
        parts = model_parts(model)
        layers = sorted({parts.check_layer(l) for l in cfg.layers}) or list(range(parts.num_layers))
        emb = model.get_output_embeddings().weight.detach()  # (V, H); only two rows per request are read
        changes: dict[int, torch.Tensor] = {}  # layer -> (H, I) change of the down-projection, (out, in)
        per_layer: dict[int, int] = {}
        counts, p_old = [], []
        for r in requests:
            prompts = [t.replace("{}", r.subject, 1) for t in prefixed(r.prompt, cfg.context_prefixes)]
            old = answer_token(tok, r.target_true) if r.target_true else greedy_token(model, tok, r.text)
            new = answer_token(tok, r.target_new)
            found = knowledge_neurons(model, tok, prompts, old, layers, cfg)
            neurons = found.neurons[: cfg.max_neurons] if cfg.max_neurons else found.neurons
            change = cfg.write_scale * emb[new].float() - cfg.erase_scale * emb[old].float()  # (H,)
            for layer, i, _, activation in neurons:
                w = parts.down_proj_weight(layer)
                sign = 1.0 if activation >= 0 else -1.0  # the neuron adds activation x value vector
                changes.setdefault(layer, torch.zeros(w.shape, dtype=torch.float32, device=w.device))[:, i] += sign * change.to(w.device)
                per_layer[layer] = per_layer.get(layer, 0) + 1
            counts.append(len(neurons))
            p_old.append(sum(found.p_answer) / len(found.p_answer))
        deltas = {parts.name("down_proj", l) + ".weight": (d.T if parts.spec.down_proj_transposed else d) for l, d in changes.items()}
        info = {"neurons": sum(counts) / len(counts), "requests_without_neurons": counts.count(0),
                "p_old": sum(p_old) / len(p_old), "neurons_per_layer": {str(l): n for l, n in sorted(per_layer.items())}}
        return deltas, info
