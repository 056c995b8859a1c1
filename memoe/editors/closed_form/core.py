"""The shared core of ROME, MEMIT and EMMET: keys, target values, statistics and the layer loop.

One edit of requests (prompt, subject, new target):

1. target values (MEMIT's ``compute_z``, batched): for every request a residual-stream delta δ at the last
   edit layer, at the fact token, optimised in one padded forward/backward per step for all requests (through
   the blocks above that layer, from the fact token on: nothing else depends on δ) to make the new target
   likely over prefixed prompts, with a KL term that keeps "{subject} is a" as it was,
   weight decay, a norm clamp and an early stop. z = h + δ.
2. for each edit layer l (ascending): keys K_l (down-projection inputs at the fact token, averaged over the
   same context prefixes everywhere: the r-ROME fix), the residual R = (z - h_last) / (layers left) on the bare
   prompt, and the
   method's solve Δ_l = solve(R, K_l, C0_l). Δ_l is put in place before the next layer's keys are computed.
3. the weights are put back: computing an edit never changes the model; ``apply`` does (and ``restore``
   undoes it bit for bit).

A method is then only its solve and its config (``rome.py``, ``memit.py``, ``emmet.py``).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from memoe.batching import encode_pairs, model_device, pad_batch, read_at, row_mean, target_index, token_nll, warn_if_too_long
from memoe.config import bounds
from memoe.contexts import ContextOptions, prefixed
from memoe.data.records import EditRequest
from memoe.editors.base import EditorConfig, WeightEditor, scratch_weights
from memoe.editors.closed_form.stats import corpus_identity, layers_stats, resolve_corpus
from memoe.errors import ConfigError
from memoe.frozen_prefix import FrozenPrefix
from memoe.models.arch import model_parts
from memoe.tokens import fact_position


@dataclass
class ClosedFormConfig(ContextOptions, EditorConfig):
    """Options shared by every closed-form editor (and the context prefixes of :class:`ContextOptions`)."""

    layers: list[int] = field(default_factory=lambda: [0], metadata=bounds(nonempty=True))
    """Edit layers (the down-projection of each); the target is set at the last one."""
    fact_token: str = field(default="subject_last", metadata=bounds(choices=("subject_last", "subject_first", "prompt_last")))
    """Token the key is read and the target written at (ROME's ``fact_token``)."""
    v_lr: float = field(default=0.5, metadata=bounds(0.0))
    """Adam learning rate of the target-value optimisation."""
    v_steps: int = field(default=25, metadata=bounds(1, 10_000))
    """Maximum optimisation steps for the target values."""
    v_weight_decay: float = field(default=1e-3, metadata=bounds(0.0))
    """Weight of ||δ||² / ||h||² in the target loss."""
    kl_factor: float = field(default=0.0625, metadata=bounds(0.0))
    """Weight of the KL term that keeps the subject's "{} is a" distribution."""
    clamp_norm_factor: float = field(default=4.0, metadata=bounds(0.0))
    """||δ|| is clamped to this times ||h|| (0: no clamp)."""
    v_stop_loss: float = field(default=5e-2, metadata=bounds(0.0))
    """Stop early once every request's target NLL is below this."""
    batched_targets: bool = True
    """Optimise all requests' targets in one padded batch (False: one request at a time, for benchmarks)."""
    target_chunk: int = field(default=8, metadata=bounds(1))
    """Requests whose target rows go through one forward/backward pass: bounds the memory of a large batch (about
    70 MB per request on SmolLM2 with two prefixes; 8 ran as fast as 16 there on 2 CPU cores); larger may be a little
    faster on a GPU."""
    rounds: int = field(default=1, metadata=bounds(1, 20))
    """Target-and-insert rounds (1: the papers' single pass). An insertion reaches its targets at the fact token
    only approximately (least squares) and also moves every other token's MLP output, so a request whose target
    was reachable can still fail; each further round optimises new targets on the model as the earlier rounds left
    it (KL to that model) and inserts their residual with the same solve. Stops early once every request's target
    NLL is below ``v_stop_loss`` at a round's start."""
    stats_corpus: str = "auto"
    """Text for C0: ``auto`` (a testbed's own corpus; on other models ``wikipedia`` if gensim is installed, else
    ``self``), ``wikipedia`` (the English Wikipedia sample the gensim wheel ships, CC BY-SA), ``self`` (text the
    model samples itself), a .txt/.jsonl path or a dataset id ``name[:config]`` such as
    ``wikitext:wikitext-103-raw-v1``."""
    stats_samples: int = field(default=20_000, metadata=bounds(1))
    """Tokens in the C0 estimate."""
    stats_cache: str | None = None
    """Cache folder for C0 (default: ``$MEMOE_CACHE`` or ``.cache/memoe``)."""


def _layer_out(parts, layer: int) -> str:
    return f"{parts.name('layers')}.{parts.check_layer(layer)}"


def fact_rows(tok, requests: list[EditRequest], prefixes: list[str], fact_token: str):
    """Every (request, prefix) text with its fact-token position and owning request index."""
    texts, positions, owner = [], [], []
    for i, r in enumerate(requests):
        for tpl in prefixed(r.prompt, prefixes):
            texts.append(tpl.replace("{}", r.subject))
            positions.append(fact_position(tok, tpl, r.subject, fact_token))
            owner.append(i)
    return texts, positions, owner


@torch.no_grad()
def read_at_facts(model, tok, requests, prefixes, fact_token, module: str, inputs: bool) -> torch.Tensor:
    """(N, D) a module's input (``inputs=True``) or output at the fact token, averaged over prefixes."""
    texts, positions, owner = fact_rows(tok, requests, prefixes, fact_token)
    seqs = tok(texts, add_special_tokens=True)["input_ids"]
    vals = read_at(model, seqs, positions, [module], inputs, tok.pad_token_id)[module].double()  # (rows, D)
    own = torch.tensor(owner, device=vals.device)
    sums = torch.zeros(len(requests), vals.shape[1], dtype=vals.dtype, device=vals.device).index_add(0, own, vals)
    return sums / torch.bincount(own, minlength=len(requests))[:, None]


def compute_keys(model, tok, requests, layer: int, cfg: ClosedFormConfig, prefixes: list[str] | None = None) -> torch.Tensor:
    """(d, N) keys: down-projection inputs at the fact token, averaged over the context prefixes (``prefixes``
    instead of the config's, if given; ``[]``: the bare prompt's own key)."""
    name = model_parts(model).name("down_proj", layer)
    prefixes = cfg.context_prefixes if prefixes is None else prefixes
    return read_at_facts(model, tok, requests, prefixes, cfg.fact_token, name, inputs=True).T


def layer_outputs(model, tok, requests, layer: int, cfg: ClosedFormConfig) -> torch.Tensor:
    """(H, N) residual stream after ``layer`` at the fact token of the bare prompt (where z was set, as MEMIT)."""
    return read_at_facts(model, tok, requests, [], cfg.fact_token, _layer_out(model_parts(model), layer), inputs=False).T


@dataclass
class TargetBatch:
    """The rows of some requests for the target optimisation: each request's prefixed prompts (with its new
    target), then one KL prompt ("{subject} is a") per request; everything indexed within the batch. Rows may start
    at their fact token (``head`` > 0): the tokens before it are then the KV cache's, not the batch's."""

    ids: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor  # (B, T)
    fact: torch.Tensor  # (B,) fact-token column of each row: δ is added there
    owner: torch.Tensor  # (B,) which request (0..n-1 within the batch) each row belongs to
    nll_index: tuple  # (row, column, label) of every target token, as token_nll takes them
    tok_row: torch.Tensor  # (target tokens,) the prompt row each target token belongs to
    n_prompt_rows: int
    kl_last: list[int]  # last column of each KL row (rows n_prompt_rows ...)
    head: list[int]  # (B,) tokens of each row left out before column 0 (0: the whole row)


class TargetRows:
    """Every request's target-optimisation rows, tokenised once; :meth:`batch` puts some requests' rows together."""

    def __init__(self, model, tok, requests: list[EditRequest], cfg: ClosedFormConfig):
        texts, positions, owner = fact_rows(tok, requests, cfg.context_prefixes, cfg.fact_token)
        p_ids, t_ids = encode_pairs(tok, texts, [requests[i].target_new for i in owner])
        self.prompt = [[(p, t, pos) for p, t, pos, o in zip(p_ids, t_ids, positions, owner) if o == i]
                       for i in range(len(requests))]
        self.kl = [(tok(f"{r.subject} is a", add_special_tokens=True)["input_ids"],
                    fact_position(tok, "{} is a", r.subject, cfg.fact_token)) for r in requests]
        self.pad_id, self.device = tok.pad_token_id, model_device(model)
        warn_if_too_long(model, [p + t for rows in self.prompt for p, t, _ in rows] + [k for k, _ in self.kl],
                         "edit prompts (with their targets)")

    def batch(self, sel: list[int], from_fact: bool = False) -> TargetBatch:
        """The rows of requests ``sel``; ``from_fact``: each row from its fact token on (the tail δ can change)."""
        prompt = [(j, *row) for j, i in enumerate(sel) for row in self.prompt[i]]
        kl = [self.kl[i] for i in sel]
        seqs = [p + t for _, p, t, _ in prompt] + [k for k, _ in kl]
        facts = [pos for *_, pos in prompt] + [pos for _, pos in kl]
        head = facts if from_fact else [0] * len(seqs)
        ids, mask = pad_batch([s[h:] for s, h in zip(seqs, head)], self.pad_id, self.device)
        tr, tc, labels = target_index([p for _, p, _, _ in prompt], [t for _, _, t, _ in prompt])
        tensor = lambda x: torch.tensor(x, device=self.device)
        return TargetBatch(ids, mask, fact=tensor([f - h for f, h in zip(facts, head)]),
                           owner=tensor([j for j, *_ in prompt] + list(range(len(sel)))),
                           nll_index=(tr, [c - head[r] for r, c in zip(tr, tc)], tensor(labels)), tok_row=tensor(tr),
                           n_prompt_rows=len(prompt),
                           kl_last=[len(k) - 1 - h for (k, _), h in zip(kl, head[len(prompt):])], head=head)


def compute_targets(model, tok, requests: list[EditRequest], layer: int, cfg: ClosedFormConfig) -> tuple[torch.Tensor, dict]:
    """(H, N) target residuals z = h + δ at ``layer`` (see module doc).

    The requests are independent (each δ moves only its own rows, Adam is elementwise), so all of them are
    optimised in one batch, and each stops once its own NLL is below ``v_stop_loss`` (as one-at-a-time
    optimisation does; only the unfinished ones run on). Their rows run ``cfg.target_chunk`` requests per
    forward/backward, which bounds memory. A step runs only what δ changes: the blocks above ``layer``, from each
    row's fact token on (the tokens before it come from a KV cache of the first pass)."""
    head = model.get_output_embeddings()
    rows, N = TargetRows(model, tok, requests, cfg), len(requests)
    chunks = lambda sel: [sel[k : k + cfg.target_chunk] for k in range(0, len(sel), cfg.target_chunk)]

    # One pass without δ. δ enters at the fact token of ``layer``, so nothing before that token, and nothing at or
    # below ``layer``, depends on it: every step starts from this pass's state after ``layer`` at the tokens from the
    # fact token on, and reads the tokens before it from this pass's KV cache (``prefix``). The pass also gives the
    # unedited "{subject} is a" distributions for the KL term and h at the fact token of each request's bare prompt.
    prefix = FrozenPrefix(model, first=model_parts(model).check_layer(layer) + 1)
    kl_ref, h_init = [], []
    with torch.no_grad():
        for sel in chunks(list(range(N))):
            b = rows.batch(sel)
            out, at_layer = prefix.record(input_ids=b.ids, attention_mask=b.mask)  # at_layer: (B, T, H)
            hidden = out.last_hidden_state
            kl_rows = torch.arange(b.n_prompt_rows, len(b.ids))
            kl_ref.append(torch.log_softmax(head(hidden[kl_rows, b.kl_last]).float(), -1))  # (n, V)
            first = [b.owner[: b.n_prompt_rows].tolist().index(j) for j in range(len(sel))]  # the bare prompt row
            h_init.append(at_layer[first, b.fact[first]].float())
            for r, (key, f, n) in enumerate(zip(_row_keys(b, sel), b.fact.tolist(), b.mask.sum(1).tolist())):
                prefix.keep(key, out, at_layer, r, f, n)
            del out, at_layer
    kl_ref, h_init = torch.cat(kl_ref), torch.cat(h_init)  # (N, V), (N, H)

    delta = torch.zeros_like(h_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    done = torch.zeros_like(h_init)  # δ of each request once its target is met (later steps leave it alone)
    req_nll = torch.full((N,), float("inf"))
    active, losses, steps = list(range(N)), [], 0
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for _step in range(cfg.v_steps):
            steps += 1
            opt.zero_grad(set_to_none=True)
            for sel in chunks(active):
                b = rows.batch(sel, from_fact=True)
                d = delta[sel]  # (n, H)
                hidden = prefix.forward(_row_keys(b, sel), b.ids, b.mask, b.head,
                                        edit=lambda s, b=b, d=d: _with_delta(s, b, d)).last_hidden_state
                row_nll = row_mean(token_nll(head, hidden, *b.nll_index), b.tok_row, b.n_prompt_rows)  # (rows,)
                nll = row_mean(row_nll, b.owner[: b.n_prompt_rows], len(sel))  # (n,) mean over each request's prompts
                req_nll[sel] = nll.detach().cpu()
                going = nll.detach() >= cfg.v_stop_loss  # (n,) still above the goal: keeps optimising
                if not going.any():
                    continue
                kl_rows = torch.arange(b.n_prompt_rows, len(b.ids))
                kl_new = torch.log_softmax(head(hidden[kl_rows, b.kl_last]).float(), -1)
                kl = torch.nn.functional.kl_div(kl_new, kl_ref[sel], log_target=True, reduction="none").sum(-1)  # (n,)
                decay = d.norm(dim=1) ** 2 / h_init[sel].norm(dim=1) ** 2
                # The papers' loss is a mean over all N requests; each chunk adds its requests' share.
                (((nll + cfg.kl_factor * kl + cfg.v_weight_decay * decay) * going).sum() / N).backward()
            losses.append(round(req_nll.mean().item(), 4))
            finished = [i for i in active if req_nll[i] < cfg.v_stop_loss]
            with torch.no_grad():
                done[finished] = delta[finished]
            active = [i for i in active if req_nll[i] >= cfg.v_stop_loss]
            if not active:
                break
            opt.step()
            if cfg.clamp_norm_factor > 0:
                with torch.no_grad():
                    limit = cfg.clamp_norm_factor * h_init.norm(dim=1, keepdim=True)
                    norm = delta.norm(dim=1, keepdim=True)
                    delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    with torch.no_grad():
        done[active] = delta[active]  # the ones that never met the goal: their last step
    z = (h_init + done).double().T  # (H, N)
    return z, {"target_losses": losses, "target_steps": steps, "target_nll": [round(x, 4) for x in req_nll.tolist()],
               "met_at_start": not active and steps == 1}


def _row_keys(b: TargetBatch, sel: list[int]) -> list[tuple[int, int]]:
    """(request, k) for each row of ``b``: its k-th row (prompts in order, then the KL prompt), whatever the batch."""
    seen: dict[int, int] = {}
    keys = []
    for j in b.owner.tolist():
        keys.append((sel[j], seen.get(sel[j], 0)))
        seen[sel[j]] = keys[-1][1] + 1
    return keys


def _with_delta(h: torch.Tensor, b: TargetBatch, d: torch.Tensor) -> torch.Tensor:
    """``h`` (B, T, H) with each row's request's δ added at its fact token."""
    h = h.clone()
    h[torch.arange(len(b.ids), device=h.device), b.fact] += d[b.owner].to(h.dtype)
    return h


class C0Memo:
    """Per-model, in-memory C0 for editors built on this core (closed-form editors, CoachHooK)."""

    def stats(self, model, tok, layers: list[int]) -> dict[int, torch.Tensor]:
        """C0 of each of ``layers``, from the model as it was when this editor first saw it (the missing ones in one
        pass). Held in memory per model: in sequential modes the edited weights change the model fingerprint, and C0
        must stay the unedited model's statistics (not be recomputed, and re-cached, after every batch)."""
        if not hasattr(self, "_c0"):
            self._c0: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        per_layer = self._c0.setdefault(model, {})
        missing = [l for l in layers if l not in per_layer]
        if missing:
            cfg = self.config
            per_layer.update(layers_stats(model, tok, missing, cfg.stats_corpus, cfg.stats_samples, cfg.stats_cache))
        return {l: per_layer[l] for l in layers}

    def stats_corpus_used(self, model) -> str:
        """The corpus C0 comes from, as the statistics cache keys it (``auto`` resolved, files by content hash)."""
        if not hasattr(self, "_corpus"):
            self._corpus: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if model not in self._corpus:
            self._corpus[model] = corpus_identity(resolve_corpus(self.config.stats_corpus, model))
        return self._corpus[model]

    def layer_covs(self, model, tok, layers: list[int]) -> dict[int, torch.Tensor]:
        """C0 per edit layer, each checked against the layer's input width."""
        parts = model_parts(model)
        covs = self.stats(model, tok, layers)
        for l, C in covs.items():
            d = parts.down_proj_weight(l).shape[1]
            if C.shape != (d, d):
                raise ConfigError(f"covariance for layer {l} has shape {tuple(C.shape)}, expected ({d}, {d})")
        return covs


@contextlib.contextmanager
def timed(info: dict, part: str):
    """Add the block's wall time to ``info["time_split"][part]`` (seconds): where an edit's time goes."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        split = info.setdefault("time_split", {})
        split[part] = round(split.get(part, 0.0) + time.perf_counter() - t0, 3)


def edit_layers(cfg: ClosedFormConfig, layers: list[int]) -> list[int]:
    if not layers or len(set(layers)) != len(layers):
        raise ConfigError(f"edit layers must be distinct and at least one, got {cfg.layers}")
    return layers


def spread_over_layers(model, tok, requests, layers: list[int], cfg: ClosedFormConfig, z: torch.Tensor, solve, write,
                       info: dict, keys=compute_keys) -> None:
    """MEMIT's layer loop: for each edit layer (ascending) keys K (d, N) (``keys(model, tok, requests, layer, cfg)``),
    the residual R (H, N) of the targets z against the last edit layer's output, divided by the layers left,
    ``delta = solve(layer, R, K)`` and ``write(layer, delta, K)``, which must put the update in place before the
    next layer's keys are read."""
    for i, l in enumerate(layers):
        with timed(info, "keys"):
            K = keys(model, tok, requests, l, cfg)  # recomputed after earlier layers' updates
            R = (z - layer_outputs(model, tok, requests, layers[-1], cfg)) / (len(layers) - i)
        with timed(info, "solve"):
            write(l, solve(l, R, K), K)


def batch_targets(model, tok, requests, layer: int, cfg: ClosedFormConfig, info: dict) -> tuple[torch.Tensor, bool]:
    """(H, N) targets for ``requests``: one joint optimisation, or one per request (``batched_targets: false``);
    and whether every request's target NLL was already below ``v_stop_loss`` before any step."""
    if cfg.batched_targets:
        with timed(info, "targets"):
            z, inf = compute_targets(model, tok, requests, layer, cfg)
        info.setdefault("target_losses", []).append(inf["target_losses"])
        return z, inf["met_at_start"]
    with timed(info, "targets"):
        zs = [compute_targets(model, tok, [r], layer, cfg) for r in requests]
    info.setdefault("target_losses", []).extend(i["target_losses"] for _, i in zs)
    return torch.cat([x for x, _ in zs], dim=1), all(i["met_at_start"] for _, i in zs)


def edit_in_rounds(model, tok, requests, layers: list[int], cfg: ClosedFormConfig, solve, write, info: dict,
                   round_context=None, keys=compute_keys) -> None:
    """Targets at the last edit layer, then :func:`spread_over_layers`; ``cfg.rounds`` times, each round on the model
    as the earlier ones left it (``write`` puts updates in place), stopping once every target is met.
    ``round_context(i)``, if given, is the context manager round ``i`` (from 0) runs in (CoachHooK: how its hooks act).
    ``info["rounds"]``: the most rounds any call inserted (ROME calls this once per request)."""
    done = 0
    for i in range(cfg.rounds):
        with round_context(i) if round_context else contextlib.nullcontext():
            z, met = batch_targets(model, tok, requests, layers[-1], cfg, info)
            if met and done:
                break  # nothing left to insert
            spread_over_layers(model, tok, requests, layers, cfg, z, solve, write, info, keys)
        done += 1
    info["rounds"] = max(info.get("rounds", 0), done)


class ClosedFormEditor(C0Memo, WeightEditor):
    """ROME, MEMIT and EMMET: the shared pipeline; subclasses give :meth:`solve` (and may edit one at a time)."""

    Config = ClosedFormConfig
    #: ROME writes one fact at a time: a batch is applied as consecutive single edits.
    one_at_a_time: bool = False

    @abstractmethod
    def solve(self, R: torch.Tensor, K: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """(H, d) update from residuals R (H, N), keys K (d, N) and C0 (d, d), all float64."""

    def keys(self, model, tok, requests: list[EditRequest], layer: int, cfg: ClosedFormConfig) -> torch.Tensor:
        """The keys :meth:`solve` gets at ``layer``: (d, N), one per request (ROME may add more)."""
        return compute_keys(model, tok, requests, layer, cfg)

    def compute_deltas(self, model, tok, requests: list[EditRequest]):
        cfg: ClosedFormConfig = self.prefixes.apply(model, tok, self.config)
        parts = model_parts(model)
        layers = edit_layers(cfg, sorted(parts.check_layer(l) for l in cfg.layers))
        weights = {l: parts.module("down_proj", l).weight for l in layers}
        info: dict = {"target_losses": [], "layers": layers}
        with timed(info, "covariance"):  # computed (or read from its cache) on first use, then held per model
            covs = self.layer_covs(model, tok, layers)
        info["stats_corpus"] = self.stats_corpus_used(model)
        groups = [[r] for r in requests] if self.one_at_a_time else [requests]

        def write(l, delta, K):
            w = weights[l]
            with torch.no_grad():  # in place for the next layer's keys; scratch_weights undoes it
                w.add_((delta.T if parts.spec.down_proj_transposed else delta).to(w.dtype))

        with scratch_weights(list(weights.values())) as originals:
            for group in groups:
                edit_in_rounds(model, tok, group, layers, cfg, lambda l, R, K: self.solve(R, K, covs[l].to(K.device)), write, info,
                               keys=self.keys)
            deltas = {parts.name("down_proj", l) + ".weight": weights[l].detach() - w0 for l, w0 in zip(layers, originals)}
        return deltas, info
