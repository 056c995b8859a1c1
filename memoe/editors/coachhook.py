"""The ``coachhook`` editor: consecutive batch editing into fixed-size hook layers (Li et al., EMNLP 2024).

Batch t of edits, with the hooks of batches < t attached and *forced* on at every token (the temporary hook):

1. targets z and keys K_t as in MEMIT (:mod:`memoe.editors.closed_form.core`, no second copy), the residual R_t
   of the targets against the current hooks, spread over the edit layers;
2. per layer the recursive least-squares update (``update: closed_form``)

       ΔD = R_t K_tᵀ (λ C0 + Σ_{s<t} K_s K_sᵀ + K_t K_tᵀ)⁻¹,   then Σ K Kᵀ += K_t K_tᵀ

   which equals MEMIT's solve over the union of all batches so far; or (``update: lightning``) D is trained
   with the same Lightning module as MEMoE on the batch's target NLL plus a C0 preservation penalty;
3. α of each layer drops to the smallest, over the batch's edit prompts, of the prompt's largest z-score, so
   every edit prompt fires somewhere (``alpha_rule: fact_token``: of the z-score at the fact token, so every edit
   prompt fires where its keys were written).

With ``rounds`` > 1 (the closed-form core's target-and-insert rounds), steps 1-2 repeat on the hooks as the
earlier rounds left them; ``later_rounds: gated`` runs those rounds through the scope gate (α lowered as in step 3
first) instead of the forced hook, so that they correct the edit as it will be used.

The base weights never change; ``restore()`` rewinds the hook memory (or detaches hooks the edit created), and a
saved hook memory attached with :func:`memoe.attach` is edited further (:class:`~memoe.editors.bypass.BypassEditor`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from memoe import nethook
from memoe.adapters.hooks import CoachHooKAdapter, HookConfig, scope_zscores
from memoe.batching import model_device, pad_batch
from memoe.config import bounds
from memoe.data.records import EditRequest
from memoe.editors.bypass import BypassEditor
from memoe.editors.closed_form.core import C0Memo, ClosedFormConfig, compute_keys, edit_in_rounds, edit_layers, timed
from memoe.editors.closed_form.solves import memit_solve
from memoe.errors import ConfigError
from memoe.models.arch import model_parts
from memoe.tokens import fact_position
from memoe.training import TrainConfig, TrainerOptions, fit_adapter


@dataclass
class CoachHooKConfig(ClosedFormConfig):
    mom2_update_weight: float = field(default=1e4, metadata=bounds(0.0))
    """λ: weight of preserving C0 in the recursive solve."""
    alpha_init: float = field(default=2.2, metadata=bounds(0.0))
    """Initial z-score threshold of the editing scope."""
    scope_gate: bool = True
    """Local editing scope (False: hooks act at every token)."""
    alpha_rule: str = field(default="prompt_peak", metadata=bounds(choices=("prompt_peak", "fact_token")))
    """After a batch α drops to the smallest, over its edit prompts, of the prompt's largest z-score (``prompt_peak``,
    the paper's) or of the z-score at the fact token, where the batch's keys were written (``fact_token``, ours: each
    edit then fires where it was written, not only somewhere in its prompt)."""
    later_rounds: str = field(default="forced", metadata=bounds(choices=("forced", "gated")))
    """With ``rounds`` > 1, how the hooks act in the rounds after the first: ``forced`` at every token, as the first
    round's temporary hook; ``gated`` through the scope gate, α first lowered as after a batch so that every edit
    prompt fires (ours): a later round then corrects the edit as it will be used, where other tokens' hook outputs
    do not fire."""
    update: str = field(default="closed_form", metadata=bounds(choices=("closed_form", "lightning")))
    """How a batch is written into the hooks: the recursive closed form, or gradient training with Lightning."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(kl_factor=0.0, aux_factor=1.0))
    """``update: lightning``: the training options (``aux_factor`` weighs the C0 preservation penalty)."""
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    """``update: lightning``: Lightning Trainer options."""

    def __post_init__(self):
        if self.update == "lightning" and self.rounds != 1:
            raise ConfigError(f"config key 'rounds': {self.rounds} rounds need update: closed_form (training has its own stop)")


def rls_update(R: torch.Tensor, K: torch.Tensor, C0: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔD = R Kᵀ (λ C0 + cov + K Kᵀ)⁻¹ (float64), written as MEMIT's solve with C = C0 + cov / λ."""
    if lam <= 0:
        raise ValueError(f"mom2_update_weight must be > 0 for the recursive solve, got {lam}")
    return memit_solve(R, K, torch.add(C0.double(), cov.double(), alpha=1.0 / lam), lam)


def _scope_inputs(tok, requests: list[EditRequest], fact_token: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edit prompts as a padded batch (ids, mask: (N, T)) and their fact-token positions (N,)."""
    ids, mask = pad_batch(tok([r.text for r in requests], add_special_tokens=True)["input_ids"], tok.pad_token_id, device)
    pos = torch.tensor([fact_position(tok, r.prompt, r.subject, fact_token) for r in requests], device=ids.device)
    return ids, mask, pos


@torch.no_grad()
def _scope_stats(model, adapter: CoachHooKAdapter, inputs, layers) -> dict[str, dict[str, torch.Tensor]]:
    ids, mask, pos = inputs
    parts = model_parts(model)
    names = {key: parts.name("down_proj", int(key)) for key in layers}
    with nethook.capture(model, list(names.values()), inputs=True) as store:
        model.base_model(input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(pos), device=ids.device)
    out = {}
    for key, name in names.items():
        m = adapter.layers[key].change(store[name]).float().norm(dim=-1)  # (B, T)
        z = scope_zscores(m.double(), mask.bool())  # (B, T)
        out[key] = {"peak": z.max(1).values, "z": z[rows, pos]}
    return out


def edit_scope_stats(model, tok, adapter: CoachHooKAdapter, requests: list[EditRequest], fact_token: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per hook layer, for each request prompt (N,): ``peak``, its largest scope z-score; ``z``, its z-score at the
    fact token (as the gate computes them, with the hooks as they are now)."""
    return _scope_stats(model, adapter, _scope_inputs(tok, requests, fact_token, model_device(model)), list(adapter.layers))


@torch.no_grad()
def update_scope(model, tok, adapter: CoachHooKAdapter, requests: list[EditRequest], cfg: CoachHooKConfig) -> None:
    """After a batch: lower each layer's α so that every edit prompt fires. Layer by layer (one forward each),
    because a later layer's keys depend on where the earlier layers' hooks now fire."""
    inputs = _scope_inputs(tok, requests, cfg.fact_token, model_device(model))  # tokenised once for all layers
    for key in sorted(adapter.layers, key=int):
        st = _scope_stats(model, adapter, inputs, [key])[key]
        hook = adapter.layers[key]
        z = st["z"] if cfg.alpha_rule == "fact_token" else st["peak"]
        hook.alpha.copy_(torch.minimum(hook.alpha, z.min()))


class CoachHooKEditor(C0Memo, BypassEditor):
    name = "coachhook"
    summary = "hook layers with a fixed-size recursive least-squares memory and a local editing scope; a bypass adapter"
    paper = "Li et al. 2024"
    Config = CoachHooKConfig
    Adapter = CoachHooKAdapter

    def _layers(self, model) -> list[int]:
        return edit_layers(self.config, sorted(model_parts(model).check_layer(l) for l in self.config.layers))

    def new_adapter_config(self, model, tok) -> HookConfig:
        cfg: CoachHooKConfig = self.config
        return HookConfig(layers=self._layers(model), alpha_init=cfg.alpha_init, scope_gate=cfg.scope_gate)

    def check_adapter(self, adapter: CoachHooKAdapter, model) -> None:
        have, want = sorted(int(k) for k in adapter.layers), self._layers(model)
        if have != want:
            raise ConfigError(f"the attached hooks are at layers {have}, this editor's config edits {want}")

    def edit(self, model, tok, adapter: CoachHooKAdapter, requests: list[EditRequest]) -> dict:
        cfg: CoachHooKConfig = self.prefixes.apply(model, tok, self.config)
        layers = self._layers(model)
        info: dict = {"layers": layers}
        with adapter.disabled(), timed(info, "covariance"):
            covs = self.layer_covs(model, tok, layers)  # the unedited base's statistics
        hooks = {l: adapter.layers[str(l)] for l in layers}
        if cfg.update == "closed_form":
            def solve(l, R, K):
                return rls_update(R, K, covs[l].to(K.device), hooks[l].cov, cfg.mom2_update_weight)

            def write(l, delta, K):
                with torch.no_grad():
                    hooks[l].delta.add_(delta.to(hooks[l].delta.dtype))
                    hooks[l].cov.add_(K @ K.T)

            def round_context(i: int):
                if i == 0 or cfg.later_rounds == "forced":
                    return adapter.forced()
                update_scope(model, tok, adapter, requests, cfg)
                return contextlib.nullcontext()

            edit_in_rounds(model, tok, requests, layers, cfg, solve, write, info, round_context)
        else:
            with adapter.forced():
                self._train(model, tok, adapter, requests, layers, covs, info, cfg)
        update_scope(model, tok, adapter, requests, cfg)
        info["alpha"] = {k: round(float(l.alpha), 4) for k, l in adapter.layers.items()}
        return info

    def _train(self, model, tok, adapter, requests, layers, covs, info, cfg: CoachHooKConfig) -> None:
        """The gradient-trained variant: D learns the batch's targets; the C0 penalty keeps other keys' outputs."""
        with adapter.preserving({l: covs[l] for l in layers}):
            res = fit_adapter(model, tok, adapter, requests, self.prefixes.apply(model, tok, cfg.train), cfg.trainer)
        info.update(steps=res["steps"], worst_nll=res["worst_nll"])
        with torch.no_grad():
            for l in layers:
                K = compute_keys(model, tok, requests, l, cfg)
                adapter.layers[str(l)].cov.add_(K @ K.T)
