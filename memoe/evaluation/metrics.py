"""The paper metrics, all in one place, computed from :func:`memoe.evaluation.scoring.score_pairs`.

Definitions (P(x) = exp(-mean token NLL of the whole target string x), teacher-forced):

CounterFact (ROME, Meng et al. 2022; MEMIT):
- Efficacy Score ``cf_efficacy``: mean over edits of [P(new) > P(true)] on the request prompt;
  ``cf_efficacy_mag``: mean of P(new) - P(true).
- Paraphrase Score ``cf_paraphrase``: mean over edits of the mean over paraphrase prompts of
  [P(new) > P(true)]; ``cf_paraphrase_mag`` likewise with P(new) - P(true).
- Neighbourhood Score ``cf_neighbourhood``: mean over edits of the mean over neighbourhood prompts of
  [P(true) > P(new)]; ``cf_neighbourhood_mag``: P(true) - P(new).
- Score ``cf_score``: harmonic mean of the three scores.
zsRE (MEND, MEMIT): token-level top-1 accuracy of the new answer on the request (``zsre_efficacy``) and on
the rephrase (``zsre_paraphrase``), and of the locality answer on the locality question (``zsre_specificity``).
EasyEdit (Yao et al. 2023): ``reliability`` / ``generality``: token accuracy of the new target on the request
/ paraphrases; ``locality``: share of locality-prompt target positions whose argmax token equals the
*unedited* model's argmax (locality prompts, or the neighbourhood prompts with the old target where a
dataset has no locality prompts).
``same_subject``: recall (all tokens argmax) of the subject's *other* relations (synthetic world).
``fluency``: ROME's generation entropy, the mean over generated texts of the 2/3-weighted 2- and 3-gram
entropies (bits).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from memoe.batching import model_device
from memoe.data.records import EditRecord
from memoe.evaluation.scoring import PairScores, score_pairs

METRIC_NAMES = (
    "cf_efficacy", "cf_paraphrase", "cf_neighbourhood", "cf_score",
    "cf_efficacy_mag", "cf_paraphrase_mag", "cf_neighbourhood_mag",
    "zsre_efficacy", "zsre_paraphrase", "zsre_specificity",
    "reliability", "generality", "locality", "same_subject", "fluency",
)


def harmonic_mean(xs: list[float]) -> float:
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# -- generation entropy ---------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of weight_n times the entropy (bits) of the n-grams."""
    words = _words(text)
    vals = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        vals.append(h * w)
    return sum(vals) / len(vals)


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 30, batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), without the prompt text."""
    side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tok(prompts[s : s + batch_size], return_tensors="pt", padding=True).to(model_device(model))
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


# -- per-edit raw scores ----------------------------------------------------------------------------------

@dataclass
class RawScores:
    """Every number the metrics need for a list of records, from one batched pass per prompt kind."""

    request_new: PairScores
    request_true: PairScores
    para_new: list[PairScores]  # per record
    para_true: list[PairScores]
    neigh_new: list[PairScores]
    neigh_true: list[PairScores]
    loc: list[PairScores]
    same: list[PairScores]
    fluency: float | None = None
    prompts_scored: int = 0
    seconds: float = 0.0


def _grouped(model, tok, groups: list[list[tuple[str, str]]], batch_size: int) -> list[PairScores]:
    """Score a list of groups of (prompt, target) pairs in one batched call; split the results back."""
    flat = [pt for g in groups for pt in g]
    s = score_pairs(model, tok, [p for p, _ in flat], [t for _, t in flat], batch_size)
    out, i = [], 0
    for g in groups:
        j = i + len(g)
        out.append(PairScores(s.nll[i:j], s.token_acc[i:j], s.argmax[i:j], s.first_prob[i:j]))
        i = j
    return out


def locality_pairs(rec: EditRecord) -> list[tuple[str, str]]:
    """The prompts EasyEdit's locality is measured on: locality prompts, else neighbours with the old target."""
    if rec.locality_prompts:
        return [(p.prompt, p.target) for p in rec.locality_prompts]
    return [(p, rec.request.target_true) for p in rec.neighborhood_prompts if rec.request.target_true]


def raw_scores(model, tok, records: list[EditRecord], batch_size: int = 64, fluency_prompts: int = 0,
               max_new_tokens: int = 30) -> RawScores:
    """Score every prompt of ``records`` against both targets, in batches."""
    t0 = time.perf_counter()
    new = lambda r, ps: [(p, r.request.target_new) for p in ps]  # noqa: E731
    true = lambda r, ps: [(p, r.request.target_true or r.request.target_new) for p in ps]  # noqa: E731
    req = _grouped(model, tok, [new(r, [r.request.text]) + true(r, [r.request.text]) for r in records], batch_size)
    rs = RawScores(
        request_new=PairScores(*[[x for g in req for x in getattr(g, f)[:1]] for f in ("nll", "token_acc", "argmax", "first_prob")]),
        request_true=PairScores(*[[x for g in req for x in getattr(g, f)[1:]] for f in ("nll", "token_acc", "argmax", "first_prob")]),
        para_new=_grouped(model, tok, [new(r, r.paraphrase_prompts) for r in records], batch_size),
        para_true=_grouped(model, tok, [true(r, r.paraphrase_prompts) for r in records], batch_size),
        neigh_new=_grouped(model, tok, [new(r, r.neighborhood_prompts) for r in records], batch_size),
        neigh_true=_grouped(model, tok, [true(r, r.neighborhood_prompts) for r in records], batch_size),
        loc=_grouped(model, tok, [locality_pairs(r) for r in records], batch_size),
        same=_grouped(model, tok, [[(p.prompt, p.target) for p in r.same_subject_prompts] for r in records], batch_size),
    )
    rs.prompts_scored = 2 * len(records) + sum(
        len(g.nll) for gs in (rs.para_new, rs.para_true, rs.neigh_new, rs.neigh_true, rs.loc, rs.same) for g in gs)
    if fluency_prompts:
        prompts = [p for r in records for p in r.generation_prompts[:fluency_prompts]]
        if prompts:
            rs.fluency = _mean(ngram_entropy(t) for t in generate(model, tok, prompts, max_new_tokens))
    rs.seconds = time.perf_counter() - t0
    return rs


def _p(nll: float) -> float:
    return math.exp(-nll)


def compute_metrics(post: RawScores, pre: RawScores | None = None) -> dict[str, float | None]:
    """Aggregate raw scores into the named metrics; ``pre`` (the unedited model's scores on the same records)
    is needed for EasyEdit's locality. A metric whose prompts a dataset lacks is ``None``."""
    n = len(post.request_new.nll)
    m: dict[str, float | None] = {}
    rn, rt = post.request_new, post.request_true
    m["cf_efficacy"] = _mean(float(rn.nll[i] < rt.nll[i]) for i in range(n))
    m["cf_efficacy_mag"] = _mean(_p(rn.nll[i]) - _p(rt.nll[i]) for i in range(n))

    def per_record(news: list[PairScores], trues: list[PairScores], fn) -> float | None:
        vals = [_mean(fn(a, b) for a, b in zip(pn.nll, pt.nll)) for pn, pt in zip(news, trues) if pn.nll]
        return _mean(vals)

    m["cf_paraphrase"] = per_record(post.para_new, post.para_true, lambda a, b: float(a < b))
    m["cf_paraphrase_mag"] = per_record(post.para_new, post.para_true, lambda a, b: _p(a) - _p(b))
    m["cf_neighbourhood"] = per_record(post.neigh_new, post.neigh_true, lambda a, b: float(b < a))
    m["cf_neighbourhood_mag"] = per_record(post.neigh_new, post.neigh_true, lambda a, b: _p(b) - _p(a))
    parts = [m["cf_efficacy"], m["cf_paraphrase"], m["cf_neighbourhood"]]
    m["cf_score"] = harmonic_mean([x for x in parts if x is not None]) if all(x is not None for x in parts) else None

    m["zsre_efficacy"] = m["reliability"] = _mean(rn.token_acc)
    m["zsre_paraphrase"] = m["generality"] = _mean(x for g in post.para_new for x in g.token_acc)
    m["zsre_specificity"] = _mean(x for g in post.loc for x in g.token_acc)
    if pre is not None:
        agree = [
            _mean(float(a == b) for a, b in zip(am_post, am_pre))
            for g_post, g_pre in zip(post.loc, pre.loc) for am_post, am_pre in zip(g_post.argmax, g_pre.argmax)
        ]
        m["locality"] = _mean(agree)
    else:
        m["locality"] = None
    m["same_subject"] = _mean(x for g in post.same for x in g.exact)
    m["fluency"] = post.fluency
    return m


def subset(rs: RawScores, idx: list[int]) -> RawScores:
    """Raw scores of the records at ``idx`` (to score a batch of edits against the pre-edit row)."""
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    one = lambda s: PairScores(pick(s.nll), pick(s.token_acc), pick(s.argmax), pick(s.first_prob))  # noqa: E731
    return RawScores(one(rs.request_new), one(rs.request_true), pick(rs.para_new), pick(rs.para_true),
                     pick(rs.neigh_new), pick(rs.neigh_true), pick(rs.loc), pick(rs.same), None)


@dataclass
class MetricsTable:
    """Rows of named metrics for Markdown output."""

    rows: list[tuple[str, dict]] = field(default_factory=list)

    def add(self, label: str, metrics: dict) -> None:
        self.rows.append((label, metrics))

    def markdown(self, columns: tuple[str, ...] | None = None) -> str:
        cols = columns or tuple(k for k in METRIC_NAMES if any(m.get(k) is not None for _, m in self.rows))
        head = "| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        return head + "\n".join(f"| {label} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |" for label, m in self.rows)
