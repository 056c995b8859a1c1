"""MEMoE (Wang & Li, 2024): a mixture of experts beside a frozen FFN, routed by knowledge anchor.

For the MLP input x_t of token t and the input a_t at the last token of its knowledge anchor (the entity
the text is about, see :mod:`memoe.adapters.anchors`):

    h_t = FFN(x_t) + λ Σ_{e in top-k} G_e(x_t, a_t) E_e(x_t)
    G(x, a) = softmax over the top-k of  W_r [x ; a] (+ noise · softplus(W_n [x ; a]) in training)

From the paper: the form above, a noisy top-k gate on the token state concatenated with the anchor embedding,
and one MoE beside one FFN. **Our choices** (the paper does not publish them): experts are low-rank linear
maps E_e(x) = B_e A_e x with B_e = 0 at start (so an untrained adapter is exactly the base), or full-rank
E_e(x) = W_e x (``rank: null``, W_e = 0 at start); the anchor embedding is the layer's own input at the anchor's
last token (contextual, so ordered names like "Kalo Mira" / "Mira Kalo" differ); a token before any anchor
has none; with ``gate_unanchored`` the bypass is exactly zero on tokens with no anchor (the locality lever);
the load-balancing term is the Switch Transformer's E · Σ_e f_e P_e over anchored tokens.

**Relation-aware form (ours, off by default)**: the paper's anchor decides both routing and scope, and the edit is
written into the entity's representation, which the entity's other facts read too. ``scope: relation`` acts only
on the tokens after the anchor (they ask for one fact and predict its answer), ``expert_input: anchor`` lets the
experts read the anchor embedding there (the new fact belongs to the entity; the router, which sees the token,
decides whether this token asks for it), and ``null_experts`` gives the router experts that output nothing, a
learned "not this fact", trained with the subject's other relations as KL rows (``kl_other_relations``).

**Relation gate (ours, off by default)**: a linear router on [x ; a] cannot say "this entity, *and* this question":
that is a product of the two. With ``relation_keys`` each edit stores the layer input at its prompt's last token
(bare and under each context prefix) as keys tagged with its anchor's id (exact, from the trie), and the bypass of
a token is scaled by

    ρ_t = σ(τ · max_{j: anchor_j = anchor_t} cos(P x_t, P k_j) + b_j)      (0 where the anchor has no key)

so it opens where the token asks of its entity what an edit asked. P (shared by every edit: it learns which
directions tell questions apart), τ and b are trained by the edit rows (open at the answer positions) against the
KL rows, the subject's other relations (shut); the keys themselves are stored, not trained.

With ``relation_negatives`` each edit also stores keys of its subject under *other* relations (the batch's own
templates), and the gate is a nearest-neighbour decision as well as a threshold:

    ρ_t = σ(τ · c⁺_t + b_j) · σ(τ⁻ · (c⁺_t − c⁻_t))      c± = max cos(P x_t, P k) over the anchor's ± keys

A question close to the edit's ("X passed away at" beside "X was employed in": both ask for a place) passes the
threshold, but sits closer to a stored question of its own relation than to the edit's. ``relation_templates`` stores
the batch's other wordings of the edit's question as keys too, and ``relation_gate_cut`` shuts a half-open gate: a
bypass strong enough to flip a fact flips the answer of a question it opens to only 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from memoe.adapters.bypass import BypassAdapter, BypassLayer, RoutingContext
from memoe.batching import read_at
from memoe.config import bounds
from memoe.errors import ConfigError
from memoe.models.arch import model_parts


@dataclass
class MEMoEConfig:
    """The adapter's shape (saved in ``adapter_config.json``)."""

    layers: list[int] = field(default_factory=lambda: [1], metadata=bounds(nonempty=True))
    """Layers whose MLP gets a MoE beside it (the paper uses one)."""
    num_experts: int = field(default=4, metadata=bounds(1, 1024))
    """Experts per layer."""
    top_k: int = field(default=2, metadata=bounds(1, 1024))
    """Experts each token is sent to; their gates are a softmax over these k and sum to one."""
    rank: int | None = field(default=16, metadata=bounds(1))
    """Rank of each low-rank expert B_e A_e; null: full-rank experts W_e (hidden x hidden)."""
    scale: float = field(default=1.0, metadata=bounds(0.0))
    """λ, the weight of the bypass output."""
    router_noise: float = field(default=1.0, metadata=bounds(0.0))
    """Scale of the noisy top-k gate's learned noise in training (0: none); inference is always noise-free."""
    use_anchor: bool = True
    """Concatenate the anchor embedding to the router input (False: a plain token router, for ablation)."""
    gate_unanchored: bool = True
    """Output exactly the base FFN on tokens with no known anchor before them (the locality lever)."""
    scope: str = field(default="anchor", metadata=bounds(choices=("anchor", "after_anchor", "relation")))
    """Anchored tokens: only each anchor's last token (the entity's representation is edited, as ROME's
    subject-position edit), that token and every token after it, or (``relation``, ours) only the tokens after it:
    they read the relation and predict the answer, and the entity's representation, which its other facts read,
    is left as it was."""
    expert_input: str = field(default="token", metadata=bounds(choices=("token", "anchor")))
    """What the experts read: the token's own input x_t (the paper), or (ours) the anchor embedding a_t, so that with
    ``scope: relation`` the entity's new fact is written at the tokens that ask for it while the router, which
    sees the token, decides whether they ask for it."""
    null_experts: int = field(default=0, metadata=bounds(0, 1024))
    """Experts that output nothing (ours; 0 = the paper): the router can learn to send a token to them, a learned
    "no edit here" (for the subject's other relations, with the ``kl_other_relations`` training rows)."""
    relation_keys: int = field(default=0, metadata=bounds(0))
    """Slots of the relation gate (ours; 0 = off, the paper). Each edit stores its layer input at the last token of
    its prompt (bare and under each context prefix) as keys tagged with its anchor's id; the bypass of a token
    whose anchor is that entity is scaled by ρ = σ(τ · max_j cos(P x_t, P k_j) + b_j) over the entity's keys, so it
    opens where the token asks what the edited prompt asks. P (shared by all edits), τ and b are trained with the
    edit rows as positives and the KL rows (the subject's other relations) as negatives (``train.gate_factor``).
    An edit beyond the slots is refused."""
    hard_relation_gate: bool = False
    """Use the relation gate as a switch, 1 where ρ > 0.5 and 0 elsewhere (gradients pass through ρ, straight-through),
    so a token it shuts gets exactly the base output rather than a small share of the edit."""
    relation_negatives: int = field(default=0, metadata=bounds(0))
    """Per edit, up to this many prompts of its subject under other relations (templates of the batch's other
    requests, sampled with the seed) stored as the subject's negative keys (ours; 0 = none): the gate then also asks
    that the token be closer to one of the edit's keys than to any of them (module docstring). They share the
    ``relation_keys`` slots."""
    relation_templates: int = field(default=0, metadata=bounds(0))
    """Per edit, up to this many of the batch's other templates of the edit's relation, filled with its subject,
    stored as further keys of the edit (ours; 0 = its prompt alone): a paraphrase then finds a key worded as it is."""
    relation_gate_cut: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    """ρ below this counts as 0, in training and inference (ours; 0 = none): a bypass trained to flip a fact
    flips the answers of questions it only half opens for, so the gate must choose. The gate loss still sees ρ."""
    relation_key_rank: int = field(default=64, metadata=bounds(1))
    """Rows of P, the learned projection the relation gate compares states in."""
    anchor_reach: str = field(default="text", metadata=bounds(choices=("text", "sentence")))
    """How far an anchor routes: every later token of the text (the paper), or (ours) only to the end of its
    sentence, so a later sentence about another entity the trie does not know ("X speaks English. Y speaks") is
    not read as X's. A sentence ends at a token whose text ends in ".", "!" or "?", or holds a line break."""
    init_std: float = field(default=0.02, metadata=bounds(0.0))
    """Standard deviation of A_e and of the router weights at initialisation."""


class MoELayer(BypassLayer):
    """The experts and router of one layer. Shapes: x (B, T, H); A (E, r, H); B (E, H, r); W_r (E + N, 2H) with
    N null experts, whose gate weight is routed to no output."""

    def __init__(self, hidden: int, cfg: MEMoEConfig):
        super().__init__()
        if cfg.top_k > cfg.num_experts + cfg.null_experts:
            raise ConfigError(f"top_k={cfg.top_k} exceeds num_experts + null_experts={cfg.num_experts + cfg.null_experts}")
        self.cfg = cfg
        E, r = cfg.num_experts, cfg.rank
        gen = torch.Generator().manual_seed(0)  # fixed init; training randomness comes from the seed
        if r is None:
            self.W = nn.Parameter(torch.zeros(E, hidden, hidden))
        else:
            self.A = nn.Parameter(torch.randn(E, r, hidden, generator=gen) * cfg.init_std)
            self.B = nn.Parameter(torch.zeros(E, hidden, r))
        router_in = 2 * hidden if cfg.use_anchor else hidden
        self.router = nn.Parameter(torch.randn(E + cfg.null_experts, router_in, generator=gen) * cfg.init_std)
        self.noise = nn.Parameter(torch.zeros(E + cfg.null_experts, router_in))
        if cfg.relation_keys:  # the relation gate (ours); the paper's form has none of these tensors
            K = cfg.relation_keys
            self.register_buffer("key_owner", torch.full((K,), -1, dtype=torch.long))  # anchor id per slot, -1: free
            self.register_buffer("keys", torch.zeros(K, hidden))  # k_j: the edited prompts' states (stored, not trained)
            self.key_proj = nn.Parameter(torch.randn(min(cfg.relation_key_rank, hidden), hidden, generator=gen) * cfg.init_std)
            self.key_scale = nn.Parameter(torch.tensor(20.0))  # τ: at start ρ = 0.5 at cosine 0.5, 1.0 at a stored key
            self.key_bias = nn.Parameter(torch.full((K,), -10.0))  # b_j
            if cfg.relation_negatives:  # slots holding another relation's question of their anchor
                self.register_buffer("key_negative", torch.zeros(K, dtype=torch.bool))
                self.negative_scale = nn.Parameter(torch.tensor(20.0))  # τ⁻
        self.relation_gate: torch.Tensor | None = None  # (B, T) ρ of the last forward (with gradients in training)
        self.aux_loss: torch.Tensor | None = None  # load-balancing loss of the last training forward
        self.last_gates: torch.Tensor | None = None  # (B, T, E) gate weights of the last forward (zeros off top-k)
        self.noise_generator: torch.Generator | None = None  # set by the trainer (seed_noise) for reproducible noise

    def gates(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, E + N) dense gate weights (softmax over the top-k, zero elsewhere) and (B, T, E + N) router probs."""
        inp = torch.cat([x, a], -1) if self.cfg.use_anchor else x
        logits = inp @ self.router.T  # (B, T, E)
        if self.training and self.cfg.router_noise > 0:
            eps = torch.randn(logits.shape, generator=self.noise_generator, device="cpu").to(logits.device)
            logits = logits + self.cfg.router_noise * eps * F.softplus(inp @ self.noise.T)
        top, idx = logits.topk(self.cfg.top_k, dim=-1)  # (B, T, k)
        dense = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
        return dense, torch.softmax(logits, -1)

    def seed_noise(self, generator: torch.Generator) -> None:
        self.noise_generator = generator

    def claim_keys(self, owners: list[int], states: torch.Tensor, negative: bool = False) -> None:
        """Store the keys of edited facts: ``states`` (n, H), the layer inputs at their prompts' last tokens, of the
        entities ``owners`` (n anchor ids); with ``negative``, questions of those entities that no edit asks."""
        if negative and not self.cfg.relation_negatives:
            raise ConfigError("negative keys need adapter.relation_negatives > 0")
        free = (self.key_owner < 0).nonzero().flatten()
        if len(owners) > len(free):
            raise ConfigError(f"relation_keys={self.cfg.relation_keys}: {len(free)} free slots, {len(owners)} new keys "
                              "(one per edit and context prefix); raise adapter.relation_keys")
        slots = free[: len(owners)]
        self.key_owner[slots] = torch.tensor(owners, dtype=torch.long, device=self.key_owner.device)
        self.keys[slots] = states.to(self.keys)
        if self.cfg.relation_negatives:
            self.key_negative[slots] = negative

    def relation_gates(self, x: torch.Tensor, anchor_id: torch.Tensor) -> torch.Tensor:
        """(B, T) ρ: how much each token asks for an edited fact of its anchor (0 where the anchor has no key)."""
        q = F.normalize(x @ self.key_proj.T, dim=-1)  # (B, T, r)
        k = F.normalize(self.keys @ self.key_proj.T, dim=-1)  # (K, r)
        cos = q @ k.T  # (B, T, K)
        mine = (self.key_owner >= 0) & (self.key_owner == anchor_id[..., None])  # (B, T, K)
        if self.cfg.relation_negatives:
            neg = mine & self.key_negative
            mine = mine & ~self.key_negative
        best = (self.key_scale * cos + self.key_bias).masked_fill(~mine, float("-inf")).amax(-1)  # (B, T); -inf: no key
        rho = torch.sigmoid(best)
        if self.cfg.relation_negatives:  # closer to the edit's question than to the entity's other ones
            c_pos = cos.masked_fill(~mine, -2.0).amax(-1)  # (B, T)
            c_neg = cos.masked_fill(~neg, -2.0).amax(-1)  # (B, T); -2 (below any cosine) where none is stored
            rho = rho * torch.sigmoid(self.negative_scale * (c_pos - c_neg))
        return rho

    def forward(self, x: torch.Tensor, out: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        xf = x.float()
        needs_anchor = self.cfg.use_anchor or self.cfg.expert_input == "anchor"
        a = ctx.anchor_inputs(self.key, xf) if needs_anchor else None  # (B, T, H), read once (it keeps decode history)
        g, probs = self.gates(xf, a)  # (B, T, E + N)
        mask = ctx.anchored(self.cfg.scope) if self.cfg.gate_unanchored else torch.ones_like(ctx.anchor_pos, dtype=torch.bool)
        g = g * mask[..., None].to(g.dtype)
        self.last_gates = g.detach()
        if self.training:  # balanced over real tokens: padding, which the rows' lengths decide, has no say
            self.aux_loss = self.balance_loss(g, probs, mask & ctx.mask[:, -mask.shape[1] :])
        g = g[..., : self.cfg.num_experts]  # the null experts' share goes nowhere
        if self.cfg.relation_keys:
            self.relation_gate = rho = self.relation_gates(xf, ctx.anchor_id) * mask.to(xf.dtype)  # (B, T)
            if self.cfg.hard_relation_gate:  # 0 or 1 forward, ρ's gradient backward
                rho = (rho > 0.5).to(rho.dtype) + rho - rho.detach()
            elif self.cfg.relation_gate_cut:  # a half-open gate is a shut one
                rho = rho * (rho >= self.cfg.relation_gate_cut).to(rho.dtype)
            g = g * rho[..., None]
        src = xf if self.cfg.expert_input == "token" else a  # (B, T, H)
        if self.cfg.rank is None:
            y = torch.einsum("bte,eoh,bth->bto", g, self.W, src)
        else:
            low = torch.einsum("bth,erh->bter", src, self.A) * g[..., None]  # (B, T, E, r)
            y = torch.einsum("bter,ehr->bth", low, self.B)  # (B, T, H)
        return out + (self.cfg.scale * y).to(out.dtype)

    def balance_loss(self, g: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Switch load balancing E · Σ_e f_e P_e over anchored tokens (1.0 when perfectly balanced)."""
        m = mask.reshape(-1)
        if not m.any():
            return probs.sum() * 0.0
        E = probs.shape[-1]
        top1 = F.one_hot(g.reshape(-1, E)[m].argmax(-1), E).float()  # (n, E)
        return E * (top1.mean(0) * probs.reshape(-1, E)[m].mean(0)).sum()


class MEMoEAdapter(BypassAdapter):
    method = "memoe"
    Config = MEMoEConfig
    target = "mlp"

    def build_layer(self, layer: int) -> MoELayer:
        return MoELayer(self.base_info["hidden_size"], self.config)

    @property
    def sentence_reach(self) -> bool:
        return self.config.anchor_reach == "sentence"

    def aux_loss(self) -> torch.Tensor | None:
        losses = [l.aux_loss for l in self.layers.values() if l.aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def gate_loss(self, rows: torch.Tensor, cols: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor | None:
        """Binary cross-entropy of the relation gate ρ of the last forward at (``rows``, ``cols``) against ``wanted``
        (1: the token asks for the edited fact; 0: it does not), the two classes weighted equally; None without one."""
        gates = [l.relation_gate for l in self.layers.values() if l.relation_gate is not None]
        if not gates or not len(rows):
            return None
        losses = []
        for rho in gates:
            p = rho[rows, cols].clamp(1e-6, 1 - 1e-6)
            bce = -(wanted * p.log() + (1 - wanted) * (1 - p).log())
            losses += [bce[wanted == c].mean() for c in (0.0, 1.0) if (wanted == c).any()]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def add_facts(self, model, tok, subjects: list[str], prompts: list[list[str]], batch_size: int = 64,
                  negative: bool = False) -> None:
        """Store the relation gate's keys of edited facts (no-op without the gate): for each subject (already an
        anchor) the base's layer inputs at the last token of each of its ``prompts`` (filled-in texts); with
        ``negative``, prompts of the subject's facts that are *not* edited (``relation_negatives``)."""
        if not self.config.relation_keys or not any(prompts):
            return
        owners = [self.trie.owner(s) for s, ps in zip(subjects, prompts) for _ in ps]
        seqs = [tok(p, add_special_tokens=True)["input_ids"] for ps in prompts for p in ps]
        names = {k: model_parts(model).name(self.target, int(k)) for k in self.layers}
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        states: dict[str, list[torch.Tensor]] = {k: [] for k in self.layers}
        with self.disabled():  # the base's states (exact for the lowest adapted layer)
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                got = read_at(model, chunk, [len(q) - 1 for q in chunk], list(names.values()), True, pad)
                for k, name in names.items():
                    states[k].append(got[name].float())  # (b, H)
        for k, layer in self.layers.items():
            layer.claim_keys(owners, torch.cat(states[k]), negative)

    def untouched_before(self, span: tuple[int, int]) -> int:
        # Gated off before the anchor's last token, whose input the router and experts read in every scope.
        return span[1] - 1 if self.config.gate_unanchored else 0

    def add_anchors(self, tok, texts: list[str]) -> None:
        """Make ``texts`` known anchors (the trained subjects, or a user's entity list)."""
        for t in texts:
            self.trie.add(tok, t)
