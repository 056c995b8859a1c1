import math
from dataclasses import dataclass

import pytest
import torch

from memoe.editors.base import EditorConfig, WeightEditor
from memoe.evaluation.harness import MODES, ScoreOptions, batches_for, pre_scores, run_mode
from memoe.evaluation.metrics import compute_metrics
from memoe.evaluation.scoring import score_pairs

PARAM = "model.layers.0.mlp.down_proj.weight"


@dataclass
class SpyConfig(EditorConfig):
    pass


class SpyEditor(WeightEditor):
    """Adds 1.0 to one weight entry per apply and records what that entry held when called."""

    name = "spy"
    Config = SpyConfig

    def __init__(self):
        super().__init__()
        self.seen: list[float] = []

    def compute_deltas(self, model, tok, requests):
        w = dict(model.named_parameters())[PARAM]
        self.seen.append(w[0, 0].item())
        d = torch.zeros_like(w)
        d[0, 0] = 1.0
        return {PARAM: d}, {"applied": len(self.seen), "alpha": {"0": 0.5}, "losses": [1.0, 0.5]}


NO_FLUENCY = ScoreOptions(fluency_prompts=0)


@pytest.mark.parametrize("mode, batches, keeps", [("single", 6, False), ("batch", 3, False),
                                                  ("sequential", 6, True), ("sequential-batch", 3, True)])
def test_modes_apply_and_restore_as_defined(mode, batches, keeps, tiny_testbed):
    tb = tiny_testbed
    recs = tb.dataset.records[:6]
    w0 = dict(tb.model.named_parameters())[PARAM][0, 0].item()
    before = {k: v.clone() for k, v in tb.model.state_dict().items()}
    spy = SpyEditor()
    r = run_mode(spy, tb.model, tb.tokenizer, recs, mode, batch_size=2, score=NO_FLUENCY, progress=False)
    assert len(spy.seen) == batches and r.restores == batches
    # restoring modes start every batch from the unedited weight; the others see the earlier edits
    expected = [w0 + (i if keeps else 0) for i in range(batches)]
    assert spy.seen == pytest.approx(expected, abs=1e-6)
    assert (r.final is not None) == keeps
    assert all(torch.equal(before[k], v) for k, v in tb.model.state_dict().items())
    assert r.num_edits == 6 and len(r.batches) == batches
    # each batch keeps the editor's small facts (numbers, flat maps), not its lists
    nll_keys = ("target_nll_before", "target_nll_after")  # every edit's, from Editor.apply
    assert [{k: v for k, v in b["info"].items() if k not in nll_keys} for b in r.batches] == [
        {"applied": i + 1, "alpha": {"0": 0.5}} for i in range(batches)]
    assert all(isinstance(b["info"][k], float) for b in r.batches for k in nll_keys)
    assert r.edits_per_second > 0 and r.peak_memory_mb > 0
    assert set(r.time_split) == {"scoring"} and r.time_split["scoring"] > 0  # the spy reports no parts of its own


def test_batches_for():
    assert [list(b) for b in batches_for("batch", 5, 2)] == [[0, 1], [2, 3], [4]]
    assert len(batches_for("sequential", 5, 2)) == 5
    with pytest.raises(ValueError, match="unknown mode"):
        batches_for("parallel", 5, 2)


def direct_nll(model, tok, prompt, target):
    """Unbatched, full-logits computation: the independent check of the batched scorer."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].float(), -1)
    return -sum(logp[len(p) - 1 + j, x].item() for j, x in enumerate(t)) / len(t)


def test_batched_scoring_equals_unbatched(tiny_testbed):
    tb = tiny_testbed
    recs = tb.dataset.records[:9]
    prompts = [r.request.text for r in recs] + [p for r in recs for p in r.paraphrase_prompts]
    targets = [r.request.target_new for r in recs] + [r.request.target_true for r in recs for _ in r.paraphrase_prompts]
    s = score_pairs(tb.model, tb.tokenizer, prompts, targets, batch_size=4)
    direct = [direct_nll(tb.model, tb.tokenizer, p, t) for p, t in zip(prompts, targets)]
    assert s.nll == pytest.approx(direct, abs=1e-4)


def test_pre_edit_row_equals_direct_computation(tiny_testbed):
    tb = tiny_testbed
    recs = tb.dataset.records[:8]
    pre = compute_metrics(pre_scores(tb.model, tb.tokenizer, recs, NO_FLUENCY))
    eff = [direct_nll(tb.model, tb.tokenizer, r.request.text, r.request.target_new)
           < direct_nll(tb.model, tb.tokenizer, r.request.text, r.request.target_true) for r in recs]
    assert pre["cf_efficacy"] == pytest.approx(sum(eff) / len(eff))
    ns = []
    for r in recs:
        vals = [direct_nll(tb.model, tb.tokenizer, p, r.request.target_true)
                < direct_nll(tb.model, tb.tokenizer, p, r.request.target_new) for p in r.neighborhood_prompts]
        if vals:
            ns.append(sum(vals) / len(vals))
    assert pre["cf_neighbourhood"] == pytest.approx(sum(ns) / len(ns))
    mag = sum(math.exp(-direct_nll(tb.model, tb.tokenizer, r.request.text, r.request.target_new))
              - math.exp(-direct_nll(tb.model, tb.tokenizer, r.request.text, r.request.target_true)) for r in recs) / len(recs)
    assert pre["cf_efficacy_mag"] == pytest.approx(mag, abs=1e-4)


class BreakThenIdle(SpyEditor):
    """The first apply scrambles the LM head; later applies change nothing."""

    def compute_deltas(self, model, tok, requests):
        w = model.lm_head.weight
        self.seen.append(0.0)
        g = torch.Generator().manual_seed(0)
        d = torch.randn(w.shape, generator=g) * 10 if len(self.seen) == 1 else torch.zeros_like(w)
        return {"lm_head.weight": d}, {}


def test_locality_is_against_the_unedited_model(tiny_testbed):
    """Batch 2 changes nothing, but batch 1 broke the model: measured against the unedited model (not
    the previous step) batch 2's locality must be low."""
    tb = tiny_testbed
    recs = tb.dataset.records[:4]
    r = run_mode(BreakThenIdle(), tb.model, tb.tokenizer, recs, "sequential-batch", batch_size=2, score=NO_FLUENCY, progress=False)
    assert r.pre["locality"] == 1.0
    assert r.final["locality"] < 0.5 and r.current["locality"] < 0.5
    assert r.final["same_subject"] < r.pre["same_subject"]


def test_all_modes_listed():
    assert list(MODES) == ["single", "batch", "sequential", "sequential-batch"]
    assert [m.restores for m in MODES.values()] == [True, True, False, False]
    assert [m.batch_size(8) for m in MODES.values()] == [1, 8, 1, 8]


def test_checkpoints_rescore_all_edits_so_far(tiny_testbed):
    """Every K edits (and after the last batch) the edits applied so far are scored again, with their own
    pre-edit rows; restoring modes take no checkpoints."""
    tb = tiny_testbed
    records = tb.dataset.records[:7]
    pre = pre_scores(tb.model, tb.tokenizer, records, NO_FLUENCY)
    r = run_mode(SpyEditor(), tb.model, tb.tokenizer, records, "sequential-batch", 2, pre=pre, score=NO_FLUENCY,
                 progress=False, checkpoint_every=3)
    assert [c["edits"] for c in r.checkpoints] == [4, 6, 7]
    assert r.checkpoints[-1]["metrics"] == r.final
    # general ability at every checkpoint: the perplexity of held-out text, against the unedited model's
    assert all(c["metrics"]["perplexity"] > 1 and c["metrics"]["perplexity_ratio"] is not None for c in r.checkpoints)

    class NullEditor(SpyEditor):  # changes nothing: each checkpoint must equal the pre-edit row of its records
        def compute_deltas(self, model, tok, requests):
            deltas, info = super().compute_deltas(model, tok, requests)
            return {k: torch.zeros_like(v) for k, v in deltas.items()}, info

    r = run_mode(NullEditor(), tb.model, tb.tokenizer, records, "sequential-batch", 2, pre=pre, score=NO_FLUENCY,
                 progress=False, checkpoint_every=3)
    for c in r.checkpoints:
        head = pre_scores(tb.model, tb.tokenizer, records[: c["edits"]], NO_FLUENCY)
        assert c["metrics"] == {**compute_metrics(head, head), "shared_subject_batch": None}  # no batch of two here holds a subject twice
    assert run_mode(SpyEditor(), tb.model, tb.tokenizer, records, "batch", 2, pre=pre, score=NO_FLUENCY,
                    progress=False, checkpoint_every=3).checkpoints == []
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        run_mode(SpyEditor(), tb.model, tb.tokenizer, records, "sequential", 1, pre=pre, score=NO_FLUENCY, checkpoint_every=0)
