"""CoachHooK hook layers (Li et al., EMNLP 2024): a fixed-size edit memory beside frozen down-projections.

At each edit layer a hook W_h starts as a copy of the frozen down-projection W0 and is stored as its change
D = W_h − W0 (H, d), with the accumulated key second moment Σ_s K_s K_sᵀ (d, d) and the scope threshold α:
one matrix of each per layer, whatever the number of edits. For the down-projection input k_i of token i:

    M_i = ||W_h k_i − W0 k_i|| = ||D k_i||,   z_i = (M_i − mean_j M_j) / std_j M_j   (over that input's real tokens)
    out_i = W_h k_i where z_i >= α, else W0 k_i          (local editing scope)

Padding never enters the mean and std. During an update the hook is *forced* on at every token (the temporary
hook of the paper, :meth:`CoachHooKAdapter.forced`); the update itself lives in :mod:`memoe.editors.coachhook`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from memoe.adapters.bypass import BypassAdapter, BypassLayer, RoutingContext
from memoe.config import bounds


@dataclass
class HookConfig:
    """The hook memory's shape (saved in ``adapter_config.json``)."""

    layers: list[int] = field(default_factory=lambda: [0, 1], metadata=bounds(nonempty=True))
    """Layers whose down-projection gets a hook."""
    alpha_init: float = field(default=2.2, metadata=bounds(0.0))
    """Initial z-score threshold of the editing scope (per layer; lowered after each batch)."""
    scope_gate: bool = True
    """Use the hook only where the z-score passes α (False: at every token, a plain RLS memory)."""


def scope_zscores(m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) z-scores of magnitudes ``m`` (B, T) within each row over the positions where ``mask`` is True
    (padding excluded); 0 where a row has no spread, -inf at masked positions."""
    maskf = mask.to(m.dtype)
    n = maskf.sum(1, keepdim=True).clamp_min(1)
    mean = (m * maskf).sum(1, keepdim=True) / n
    var = (((m - mean) * maskf) ** 2).sum(1, keepdim=True) / n
    std = var.sqrt()
    z = torch.where(std > 1e-12, (m - mean) / std.clamp_min(1e-12), torch.zeros_like(m))
    return z.masked_fill(~mask, float("-inf"))


class HookLayer(BypassLayer):
    """D (H, d) trainable; ``cov`` (d, d) float64 Σ K Kᵀ and ``alpha`` () are buffers (saved, not trained)."""

    def __init__(self, hidden: int, inter: int, cfg: HookConfig):
        super().__init__()
        self.cfg = cfg
        self.delta = nn.Parameter(torch.zeros(hidden, inter))
        self.register_buffer("cov", torch.zeros(inter, inter, dtype=torch.float64))
        self.register_buffer("alpha", torch.tensor(cfg.alpha_init, dtype=torch.float64))
        self.force = False

    def gate(self, m: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """(B, T) where the hook output is used, for magnitudes ``m`` (B, T) of this forward's positions."""
        if self.force or not self.cfg.scope_gate:
            return torch.ones_like(m, dtype=torch.bool)
        full = ctx.with_history(self.key + ":m", m)  # decode steps see the whole text's statistics
        mask = ctx.mask if ctx.mask is not None and ctx.mask.shape == full.shape else torch.ones_like(full, dtype=torch.bool)
        z = scope_zscores(full.double(), mask)
        return (z >= self.alpha)[:, -m.shape[1]:]

    def change(self, k: torch.Tensor) -> torch.Tensor:
        """(B, T, H) D k = W_h k − W0 k for down-projection inputs ``k`` (B, T, d), in the base's precision: beside
        a bfloat16 Llama-3-8B a float32 product would cost more than the down-projection itself (measured +35%
        per token on an H200 with five hooks, float32)."""
        return k @ self.delta.T.to(k.dtype)

    def forward(self, k: torch.Tensor, out: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        dk = self.change(k)  # (B, T, H)
        g = self.gate(dk.detach().float().norm(dim=-1), ctx)
        return out + (dk * g[..., None].to(dk.dtype)).to(out.dtype)


class CoachHooKAdapter(BypassAdapter):
    method = "coachhook"
    Config = HookConfig
    target = "down_proj"
    uses_anchors = False

    def build_layer(self, layer: int) -> HookLayer:
        return HookLayer(self.base_info["hidden_size"], self.base_info["intermediate_size"], self.config)

    @contextlib.contextmanager
    def forced(self) -> Iterator[None]:
        """Use the hooks at every token (the temporary hook during an update or training)."""
        old = [l.force for l in self.layers.values()]
        for l in self.layers.values():
            l.force = True
        try:
            yield
        finally:
            for l, f in zip(self.layers.values(), old):
                l.force = f

    def memory_bytes(self) -> int:
        """Bytes of the hook memory (D, Σ K Kᵀ and α of every layer): constant in the number of edits."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    #: {layer: (C0, D at the start)} while :meth:`preserving` is active (the gradient-trained update)
    preserve: dict | None = None

    @contextlib.contextmanager
    def preserving(self, covs: dict[int, torch.Tensor]) -> Iterator[None]:
        """Within the block, :meth:`aux_loss` penalises moving the hooks' outputs on the base's keys: C0 of each layer
        (``covs``), measured from D as it is on entry."""
        device = next(iter(self.layers.values())).delta.device
        self.preserve = {str(l): (C.float().to(device), self.layers[str(l)].delta.detach().clone()) for l, C in covs.items()}
        try:
            yield
        finally:
            self.preserve = None

    def aux_loss(self) -> torch.Tensor | None:
        """Σ_l tr(ΔD C0 ΔDᵀ) / tr(C0): how much the update moves the outputs on the base's key distribution."""
        if not self.preserve:
            return None
        losses = []
        for key, (C0, D0) in self.preserve.items():
            dD = self.layers[key].delta - D0
            losses.append(((dD @ C0) * dD).sum() / C0.diagonal().sum())
        return torch.stack(losses).sum()
