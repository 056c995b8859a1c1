"""FT-L: constrained fine-tuning of MLP down-projections on the edit requests (ROME/MEMIT papers' baseline).

A few Adam steps on the new targets' NLL, with the change to each weight clamped to an L-infinity ball of
radius ``norm_constraint`` after every step. All requests of a batch go through one padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memoe.batching import target_nll
from memoe.config import bounds
from memoe.data.records import EditRequest
from memoe.editors.base import EditorConfig, WeightEditor, scratch_weights
from memoe.models.arch import model_parts


@dataclass
class FTConfig(EditorConfig):
    layers: list[int] = field(default_factory=lambda: [1], metadata=bounds(nonempty=True))
    """Layers whose MLP down-projection is fine-tuned."""
    lr: float = field(default=5e-3, metadata=bounds(0.0))
    """Adam learning rate."""
    steps: int = field(default=25, metadata=bounds(1, 10_000))
    """Optimiser steps per batch of requests."""
    norm_constraint: float = field(default=2e-2, metadata=bounds(0.0))
    """L-infinity radius of the allowed change per weight entry (0 = unconstrained)."""
    stop_loss: float = field(default=1e-2, metadata=bounds(0.0))
    """Stop early once the mean target NLL is below this."""


class FTEditor(WeightEditor):
    name = "ft"
    summary = "FT-L: Adam on the new targets' NLL over one MLP down-projection, the change clamped to an L∞ ball"
    paper = "Zhu et al. 2020; as in ROME"
    Config = FTConfig

    def compute_deltas(self, model, tok, requests: list[EditRequest]):
        cfg: FTConfig = self.config
        parts = model_parts(model)
        names = [parts.name("down_proj", l) + ".weight" for l in cfg.layers]
        params = dict(model.named_parameters())
        weights = [params[n] for n in names]
        prompts = [r.text for r in requests]
        targets = [r.target_new for r in requests]
        losses = []
        with scratch_weights(weights) as originals:
            for w in weights:
                w.requires_grad_(True)
            opt = torch.optim.Adam(weights, lr=cfg.lr)
            for _ in range(cfg.steps):
                loss = target_nll(model, tok, prompts, targets).mean()
                losses.append(loss.item())
                if loss.item() < cfg.stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cfg.norm_constraint > 0:
                    with torch.no_grad():
                        for w, w0 in zip(weights, originals):
                            w.copy_(w0 + (w - w0).clamp(-cfg.norm_constraint, cfg.norm_constraint))
            deltas = {n: (w.detach() - w0) for n, w, w0 in zip(names, weights, originals)}
        return deltas, {"losses": losses, "steps": len(losses)}
