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
A neighbourhood prompt that asks about a fact the run itself edits (another edited subject, same relation) is no
neighbour: after a batch its answer *should* change. Every neighbourhood score leaves it out (:func:`edited_neighbours`).
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

import functools
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from memoe.batching import model_device, pad_batch, token_nll
from memoe.config import bounds
from memoe.data.records import EditRecord
from memoe.editors.closed_form.stats import wikipedia_paragraphs
from memoe.errors import MissingFileError
from memoe.evaluation.generation import greedy_answers, hits, same_answer
from memoe.evaluation.scoring import PairScores, score_pairs

METRIC_NAMES = (
    "cf_efficacy", "cf_paraphrase", "cf_neighbourhood", "cf_score",
    "cf_efficacy_mag", "cf_paraphrase_mag", "cf_neighbourhood_mag",
    "zsre_efficacy", "zsre_paraphrase", "zsre_specificity",
    "reliability", "generality", "locality", "same_subject", "fluency",
    "gen_efficacy", "gen_paraphrase", "gen_neighbourhood", "gen_reliability", "gen_generality", "gen_locality", "gen_same_subject",
    "cf_plus_neighbourhood", "prefixed_efficacy", "same_subject_agreement", "shared_subject_batch", "perplexity", "perplexity_ratio",
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
class ScoreOptions:
    """How edits are scored."""

    batch_size: int = field(default=64, metadata=bounds(1))
    """Prompts per scoring forward pass."""
    fluency_prompts: int = field(default=1, metadata=bounds(0))
    """Generation prompts per record for the fluency metric (0: off)."""
    max_new_tokens: int = field(default=30, metadata=bounds(1))
    """Tokens generated per fluency prompt."""
    generation: bool = True
    """Generation-based metrics beside the teacher-forced ones (``gen_*``): greedy answers, at most
    ``gen_max_new_tokens``, stopping at ".", a newline or the end of sequence (docs/guide.md, Metrics)."""
    gen_max_new_tokens: int = field(default=50, metadata=bounds(1))
    """Most tokens of a generated answer (the protocol's 50)."""
    stress: bool = True
    """The stress sets: CounterFact+ neighbourhood, prefixed efficacy, same-subject agreement."""
    perplexity_texts: int = field(default=8, metadata=bounds(0))
    """Held-out Wikipedia paragraphs (the sample gensim ships; not editing data) for the perplexity of the edited
    model against the unedited one's (0: off; skipped without gensim)."""


#: The unrelated sentence before the request prompt in ``prefixed_efficacy``.
PREFIX = "The museum reopened last spring after a long renovation."
#: Tokens of each held-out paragraph in the perplexity.
PERPLEXITY_TOKENS = 128


@dataclass
class RawScores:
    """Every number the metrics need for a list of records, from one batched pass per prompt kind. Per-record fields
    are lists aligned with the records; fields of an option that was off are None."""

    request_new: PairScores
    request_true: PairScores
    para_new: list[PairScores]  # per record
    para_true: list[PairScores]
    neigh_new: list[PairScores]
    neigh_true: list[PairScores]
    loc: list[PairScores]
    same: list[PairScores]
    fluency: float | None = None
    targets: list[str] = field(default_factory=list)  # each record's new target
    answers: dict[str, list[list[str]]] | None = None
    """Generated answers per record: ``request`` (one), ``para``, ``neigh``, ``loc``, ``probe`` (the subject under
    other relations)."""
    plus_new: list[PairScores] | None = None  # CounterFact+: the edit's sentence, then each neighbourhood prompt
    plus_true: list[PairScores] | None = None
    prefixed_new: PairScores | None = None  # the request prompt after PREFIX
    prefixed_true: PairScores | None = None
    probe_next: list[list[int]] | None = None  # per record, the argmax next token after each probe prompt
    perplexity: list[float] = field(default_factory=list)  # one per scoring call (the model as it was then)
    prompts_scored: int = 0
    seconds: float = 0.0


def _grouped(model, tok, kinds: dict[str, list[list[tuple[str, str]]]], batch_size: int) -> dict[str, list[PairScores]]:
    """Score every kind's groups of (prompt, target) pairs in one batched call (prompts shared between kinds, such
    as a neighbour scored against both targets, are run once); split the results back per kind and group."""
    flat = [pt for groups in kinds.values() for g in groups for pt in g]
    s = score_pairs(model, tok, [p for p, _ in flat], [t for _, t in flat], batch_size)
    out, i = {}, 0
    for kind, groups in kinds.items():
        out[kind] = []
        for g in groups:
            j = i + len(g)
            out[kind].append(PairScores(s.nll[i:j], s.token_acc[i:j], s.argmax[i:j], s.first_prob[i:j]))
            i = j
    return out


def _joined(groups: list[PairScores]) -> PairScores:
    return PairScores(*[[x for g in groups for x in getattr(g, f)] for f in ("nll", "token_acc", "argmax", "first_prob")])


def locality_pairs(rec: EditRecord, neighbours: list[str]) -> list[tuple[str, str]]:
    """The prompts EasyEdit's locality is measured on: locality prompts, else ``neighbours`` (the record's neighbours
    but the :func:`edited_neighbours`) with the old target."""
    if rec.locality_prompts:
        return [(p.prompt, p.target) for p in rec.locality_prompts]
    return [(p, rec.request.target_true) for p in neighbours if rec.request.target_true]


def edited_neighbours(records: list[EditRecord]) -> frozenset[tuple[object, str]]:
    """(case id, prompt) of each neighbourhood prompt of ``records`` (the whole run) that asks about a fact the run
    itself edits: it names *another* subject the run edits under the record's relation. After the run its answer
    *should* change, so every neighbourhood score leaves it out, as :func:`subject_probes` leaves out edited facts."""
    subjects: dict[str, set[str]] = {}
    for r in records:
        if r.request.relation:
            subjects.setdefault(r.request.relation, set()).add(r.request.subject)
    # one pattern per relation, longest names first, matched as whole words
    patterns = {rel: re.compile(r"(?<!\w)(?:" + "|".join(re.escape(x) for x in sorted(subs, key=len, reverse=True)) + r")(?!\w)")
                for rel, subs in subjects.items()}
    return frozenset((r.case_id, p) for r in records if r.request.relation for p in r.neighborhood_prompts
                     if any(m.group() != r.request.subject for m in patterns[r.request.relation].finditer(p)))


def subject_probes(records: list[EditRecord], per_record: int = 3) -> dict:
    """case id -> the record's subject asked about other relations, as (prompt, answer or None) pairs: its
    ``same_subject_prompts`` where the dataset has them (the synthetic world), else up to ``per_record`` other
    relations' request templates among ``records`` filled with the subject (the first distinct relations in record
    order). ``records`` is the whole run: a probe of a fact the run also edits (the subject's request under another
    record) is left out, since after the run its answer *should* change."""
    templates = list(dict.fromkeys((r.request.relation, r.request.prompt) for r in records if r.request.relation))
    by_relation: dict = {}
    for rel, template in templates:
        by_relation.setdefault(rel, template)  # each relation's first template
    edited_texts = {r.request.text for r in records}
    edited_relations = {(r.request.subject, r.request.relation) for r in records if r.request.relation}
    out = {}
    for r in records:
        if r.same_subject_prompts:
            out[r.case_id] = tuple((p.prompt, p.target) for p in r.same_subject_prompts if p.prompt not in edited_texts)
        else:
            others = [t for rel, t in by_relation.items() if (r.request.subject, rel) not in edited_relations][:per_record]
            out[r.case_id] = tuple((t.format(r.request.subject), None) for t in others)
    return out


def _split(flat: list, groups: list[list]) -> list[list]:
    out, i = [], 0
    for g in groups:
        out.append(flat[i : i + len(g)])
        i += len(g)
    return out


def raw_scores(model, tok, records: list[EditRecord], opts: ScoreOptions | None = None, probes: dict | None = None,
               skip_neighbours: frozenset | None = None) -> RawScores:
    """Score every prompt of ``records`` against both targets, in batches; with ``opts`` also generate, stress and
    measure perplexity (default: teacher-forced scores only). ``probes``: :func:`subject_probes` of the whole run,
    ``skip_neighbours``: its :func:`edited_neighbours` (default: both of ``records``)."""
    opts = opts or ScoreOptions(fluency_prompts=0, generation=False, stress=False, perplexity_texts=0)
    bs = opts.batch_size
    t0 = time.perf_counter()
    new = lambda r, ps: [(p, r.request.target_new) for p in ps]
    true = lambda r, ps: [(p, r.request.target_true or r.request.target_new) for p in ps]
    probes = probes if probes is not None else subject_probes(records)
    skip = skip_neighbours if skip_neighbours is not None else edited_neighbours(records)
    neighbours = [[p for p in r.neighborhood_prompts if (r.case_id, p) not in skip] for r in records]
    probe_prompts = [[p for p, _ in probes.get(r.case_id, ())] for r in records]
    kinds = {"request_new": [new(r, [r.request.text]) for r in records], "request_true": [true(r, [r.request.text]) for r in records],
             "para_new": [new(r, r.paraphrase_prompts) for r in records], "para_true": [true(r, r.paraphrase_prompts) for r in records],
             "neigh_new": [new(r, ps) for r, ps in zip(records, neighbours)],
             "neigh_true": [true(r, ps) for r, ps in zip(records, neighbours)],
             "loc": [locality_pairs(r, ps) for r, ps in zip(records, neighbours)],
             "same": [[(p, t) for p, t in probes.get(r.case_id, ()) if t is not None] for r in records]}
    if opts.stress:
        plus = [[f"{r.request.text} {r.request.target_new}. {p}" for p in ps] for r, ps in zip(records, neighbours)]
        prefixed = [[f"{PREFIX} {r.request.text}"] for r in records]
        kinds.update(plus_new=[new(r, ps) for r, ps in zip(records, plus)], plus_true=[true(r, ps) for r, ps in zip(records, plus)],
                     prefixed_new=[new(r, ps) for r, ps in zip(records, prefixed)],
                     prefixed_true=[true(r, ps) for r, ps in zip(records, prefixed)],
                     probe=[new(r, ps) for r, ps in zip(records, probe_prompts)])
    s = _grouped(model, tok, kinds, bs)  # every teacher-forced score in one call
    rs = RawScores(request_new=_joined(s["request_new"]), request_true=_joined(s["request_true"]), para_new=s["para_new"],
                   para_true=s["para_true"], neigh_new=s["neigh_new"], neigh_true=s["neigh_true"], loc=s["loc"], same=s["same"])
    rs.targets = [r.request.target_new for r in records]
    rs.prompts_scored = 2 * len(records) + sum(
        len(g.nll) for gs in (rs.para_new, rs.para_true, rs.neigh_new, rs.neigh_true, rs.loc, rs.same) for g in gs)
    if opts.generation:
        gen_kinds = {"request": [[r.request.text] for r in records], "para": [list(r.paraphrase_prompts) for r in records],
                     "neigh": neighbours,
                     "loc": [[p.prompt for p in r.locality_prompts] for r in records], "probe": probe_prompts}
        flat = [p for groups in gen_kinds.values() for g in groups for p in g]
        gen = greedy_answers(model, tok, flat, opts.gen_max_new_tokens, bs)
        rs.answers, i = {}, 0
        for kind, groups in gen_kinds.items():
            n = sum(len(g) for g in groups)
            rs.answers[kind] = _split(gen[i : i + n], groups)
            i += n
        rs.prompts_scored += len(flat)
    if opts.stress:
        rs.plus_new, rs.plus_true = s["plus_new"], s["plus_true"]
        rs.prefixed_new, rs.prefixed_true = _joined(s["prefixed_new"]), _joined(s["prefixed_true"])
        # the next-token argmax after each probe: the first position of any target (here the new one) predicts it
        rs.probe_next = [[am[0] for am in g.argmax] for g in s["probe"]]
        rs.prompts_scored += 2 * sum(len(ps) for ps in plus) + 2 * len(records) + sum(len(ps) for ps in probe_prompts)
    if opts.perplexity_texts:
        texts = heldout_texts(opts.perplexity_texts)
        if texts:
            rs.perplexity = [perplexity(model, tok, texts, bs)]
    if opts.fluency_prompts:
        prompts = [p for r in records for p in r.generation_prompts[:opts.fluency_prompts]]
        if prompts:
            rs.fluency = _mean(ngram_entropy(t) for t in generate(model, tok, prompts, opts.max_new_tokens))
    rs.seconds = time.perf_counter() - t0
    return rs


@functools.lru_cache(maxsize=4)
def heldout_texts(n: int) -> list[str]:
    """The first ``n`` paragraphs of the Wikipedia sample gensim ships, after the first 1,000 (the covariance
    statistics read from the start); empty without gensim."""
    try:
        paragraphs = wikipedia_paragraphs()
    except MissingFileError:
        return []
    return paragraphs[1000 : 1000 + n]


@torch.no_grad()
def perplexity(model, tok, texts: list[str], batch_size: int = 64) -> float:
    """exp of the mean token NLL over ``texts`` (each cut to its first PERPLEXITY_TOKENS tokens, BOS first)."""
    ids = [x[:PERPLEXITY_TOKENS] for x in tok(texts, add_special_tokens=True)["input_ids"] if len(x) > 1]
    head, device, total, count = model.get_output_embeddings(), model_device(model), 0.0, 0
    for s in range(0, len(ids), batch_size):
        rows = ids[s : s + batch_size]
        batch, mask = pad_batch(rows, tok.pad_token_id, device)
        hidden = model.base_model(input_ids=batch, attention_mask=mask).last_hidden_state  # (B, T, H)
        r = [b for b, x in enumerate(rows) for _ in x[1:]]
        c = [j for x in rows for j in range(len(x) - 1)]
        labels = torch.tensor([t for x in rows for t in x[1:]], device=device)
        total += token_nll(head, hidden, r, c, labels).double().sum().item()
        count += len(labels)
    return math.exp(total / count)


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
    m.update(_generation_metrics(post, pre))
    m.update(_stress_metrics(post, pre))
    m["perplexity"] = _mean(post.perplexity)
    m["perplexity_ratio"] = m["perplexity"] / _mean(pre.perplexity) if m["perplexity"] and pre is not None and pre.perplexity else None
    return m


def _generation_metrics(post: RawScores, pre: RawScores | None) -> dict[str, float | None]:
    """``gen_*``: the answers a user would see (:mod:`memoe.evaluation.generation`)."""
    keys = ("gen_efficacy", "gen_paraphrase", "gen_neighbourhood", "gen_reliability", "gen_generality", "gen_locality", "gen_same_subject")
    if post.answers is None:
        return dict.fromkeys(keys)
    a, targets = post.answers, post.targets
    per_record = lambda kind, fn: _mean(_mean(fn(i, j, x) for j, x in enumerate(g)) for i, g in enumerate(a[kind]) if g)
    hit_new = lambda i, j, x: float(hits(x, targets[i]))
    agree = lambda kind: (lambda i, j, x: float(same_answer(x, pre.answers[kind][i][j])))
    has_pre = pre is not None and pre.answers is not None
    m = {"gen_efficacy": per_record("request", hit_new), "gen_paraphrase": per_record("para", hit_new),
         "gen_neighbourhood": per_record("neigh", agree("neigh")) if has_pre else None,
         "gen_locality": per_record("loc", agree("loc")) if has_pre else None,
         "gen_same_subject": per_record("probe", agree("probe")) if has_pre else None}
    has_loc = any(a["loc"])  # zsRE's names, where the dataset has locality prompts
    m["gen_reliability"] = m["gen_efficacy"] if has_loc else None
    m["gen_generality"] = m["gen_paraphrase"] if has_loc else None
    if not has_loc:
        m["gen_locality"] = None
    return {k: m[k] for k in keys}


def _stress_metrics(post: RawScores, pre: RawScores | None) -> dict[str, float | None]:
    """CounterFact+ neighbourhood, prefixed efficacy and same-subject agreement (teacher-forced)."""
    keys = ("cf_plus_neighbourhood", "prefixed_efficacy", "same_subject_agreement")
    if post.plus_new is None:
        return dict.fromkeys(keys)
    plus = [_mean(float(t < n) for n, t in zip(pn.nll, pt.nll)) for pn, pt in zip(post.plus_new, post.plus_true) if pn.nll]
    pre_ok = pre is not None and pre.probe_next is not None
    agree = [float(a == b) for g_post, g_pre in zip(post.probe_next, pre.probe_next) for a, b in zip(g_post, g_pre)] if pre_ok else []
    return {"cf_plus_neighbourhood": _mean(plus),
            "prefixed_efficacy": _mean(float(n < t) for n, t in zip(post.prefixed_new.nll, post.prefixed_true.nll)),
            "same_subject_agreement": _mean(agree) if pre_ok else None}


def shared_subject_batch(rs: RawScores, records: list[EditRecord], batches: list[range]) -> float | None:
    """Efficacy over the edits whose subject has another edit in the same batch (MEMIT is known to fail such batches,
    MEMIT-Merge 2025); None when no batch holds two edits of one subject. ``rs`` scores ``records`` in order."""
    idx = [i for b in batches for i in b if Counter(records[j].request.subject for j in b)[records[i].request.subject] > 1]
    return _mean(float(rs.request_new.nll[i] < rs.request_true.nll[i]) for i in idx) if idx else None


def _pairs(parts: list[PairScores]) -> PairScores:
    return PairScores(*[[x for p in parts for x in getattr(p, g)] for g in ("nll", "token_acc", "argmax", "first_prob")])


def concat(parts: list[RawScores]) -> RawScores:
    """Raw scores of consecutive record batches as one (fluency: the mean of the batches'; perplexity: each batch's)."""
    lists = lambda f: [x for p in parts for x in getattr(p, f)]
    some = lambda f: all(getattr(p, f) is not None for p in parts)
    flu = [p.fluency for p in parts if p.fluency is not None]
    return RawScores(
        _pairs([p.request_new for p in parts]), _pairs([p.request_true for p in parts]), lists("para_new"), lists("para_true"),
        lists("neigh_new"), lists("neigh_true"), lists("loc"), lists("same"), sum(flu) / len(flu) if flu else None,
        targets=lists("targets"),
        answers={k: [g for p in parts for g in p.answers[k]] for k in parts[0].answers} if some("answers") else None,
        plus_new=lists("plus_new") if some("plus_new") else None, plus_true=lists("plus_true") if some("plus_true") else None,
        prefixed_new=_pairs([p.prefixed_new for p in parts]) if some("prefixed_new") else None,
        prefixed_true=_pairs([p.prefixed_true for p in parts]) if some("prefixed_true") else None,
        probe_next=lists("probe_next") if some("probe_next") else None, perplexity=lists("perplexity"),
        prompts_scored=sum(p.prompts_scored for p in parts), seconds=sum(p.seconds for p in parts))


def subset(rs: RawScores, idx: list[int]) -> RawScores:
    """Raw scores of the records at ``idx`` (to score a batch of edits against the pre-edit row). Model-level figures
    (fluency, perplexity) stay whole: they do not belong to records."""
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]
    one = lambda s: None if s is None else PairScores(pick(s.nll), pick(s.token_acc), pick(s.argmax), pick(s.first_prob))
    return RawScores(one(rs.request_new), one(rs.request_true), pick(rs.para_new), pick(rs.para_true),
                     pick(rs.neigh_new), pick(rs.neigh_true), pick(rs.loc), pick(rs.same), None, targets=pick(rs.targets),
                     answers=None if rs.answers is None else {k: pick(v) for k, v in rs.answers.items()},
                     plus_new=pick(rs.plus_new), plus_true=pick(rs.plus_true), prefixed_new=one(rs.prefixed_new),
                     prefixed_true=one(rs.prefixed_true), probe_next=pick(rs.probe_next), perplexity=list(rs.perplexity))


def fmt_metric(v: float | None) -> str:
    """A metric's table cell: three decimals; a huge value (a broken model's perplexity) in scientific notation."""
    if v is None:
        return "–"
    return f"{v:.3f}" if abs(v) < 1e6 else f"{v:.2e}"


@dataclass
class MetricsTable:
    """Rows of named metrics for Markdown output."""

    rows: list[tuple[str, dict]] = field(default_factory=list)

    def add(self, label: str, metrics: dict) -> None:
        self.rows.append((label, metrics))

    def markdown(self, columns: tuple[str, ...] | None = None) -> str:
        cols = columns or tuple(k for k in METRIC_NAMES if any(m.get(k) is not None for _, m in self.rows))
        head = "| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
        return head + "\n".join(f"| {label} | " + " | ".join(fmt_metric(m.get(c)) for c in cols) + " |" for label, m in self.rows)
