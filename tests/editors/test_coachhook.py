import copy

import pytest
import torch

from memoe.adapters import attached, detach
from memoe.config import ConfigError
from memoe.editors import attach, editor_class
from memoe.editors.closed_form.solves import memit_solve
from memoe.editors.coachhook import edit_scope_stats, rls_update
from memoe.evaluation.harness import run_mode

# The tiny testbed looks facts up at the prompt's last token (its causal trace).
CFG = {"layers": [0, 1], "fact_token": "prompt_last", "mom2_update_weight": 10.0, "v_steps": 40, "stats_samples": 4000}


def test_recursive_update_equals_memits_solve_over_the_union():
    g = torch.Generator().manual_seed(0)
    H, d, lam = 5, 8, 3.0
    X = torch.randn(d, 40, generator=g, dtype=torch.float64)
    C0 = X @ X.T / 40
    W0 = torch.randn(H, d, generator=g, dtype=torch.float64)
    Ks = [torch.randn(d, n, generator=g, dtype=torch.float64) for n in (3, 2, 4)]
    Vs = [torch.randn(H, K.shape[1], generator=g, dtype=torch.float64) for K in Ks]
    W, cov = W0.clone(), torch.zeros(d, d, dtype=torch.float64)
    for K, V in zip(Ks, Vs):
        W = W + rls_update(V - W @ K, K, C0, cov, lam)  # residual against the current hook
        cov = cov + K @ K.T
    K, V = torch.cat(Ks, 1), torch.cat(Vs, 1)
    union = W0 + memit_solve(V - W0 @ K, K, C0, lam)
    assert torch.allclose(W, union, atol=1e-9)


def test_every_edit_prompt_fires_and_sequential_batches_work(tiny_testbed):
    model = copy.deepcopy(tiny_testbed.model)
    tok, recs = tiny_testbed.tokenizer, tiny_testbed.dataset.records[:6]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = editor_class("coachhook")(CFG)
    r1 = editor.apply(model, tok, [r.request for r in recs[:3]])
    adapter = editor.adapter(model)
    for key, st in edit_scope_stats(model, tok, adapter, [r.request for r in recs[:3]], "prompt_last").items():
        assert (st["peak"] >= adapter.layers[key].alpha).all()
    assert float(adapter.layers["0"].alpha) <= 2.2
    bytes_one = adapter.memory_bytes()
    r2 = editor.apply(model, tok, [r.request for r in recs[3:]])
    assert editor.adapter(model) is adapter and adapter.memory_bytes() == bytes_one
    r2.restore()
    r1.restore()
    assert attached(model) == [] and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    run = run_mode(editor, model, tok, recs, "sequential-batch", 3, progress=False)
    # (the tiny testbed is hard for closed forms: quality is measured on the CounterFact testbed, see README)
    assert run.final["cf_efficacy_mag"] > run.pre["cf_efficacy_mag"] + 0.05


def test_save_reload_and_continue_equals_an_uninterrupted_run(tiny_testbed, tmp_path):
    tok, recs = tiny_testbed.tokenizer, tiny_testbed.dataset.records[:4]
    reqs = [r.request for r in recs]
    editor = editor_class("coachhook")(CFG)
    straight = copy.deepcopy(tiny_testbed.model)
    editor.apply(straight, tok, reqs[:2])
    editor.apply(straight, tok, reqs[2:])
    want = {k: v.clone() for k, v in editor.adapter(straight).state_dict().items()}

    first = copy.deepcopy(tiny_testbed.model)
    editor2 = editor_class("coachhook")(CFG)
    editor2.apply(first, tok, reqs[:2])
    editor2.adapter(first).save(tmp_path / "hooks")
    detach(first)
    later = copy.deepcopy(tiny_testbed.model)  # a new session: fresh base, saved hooks
    attach(later, tmp_path / "hooks")
    editor3 = editor_class("coachhook")(CFG)
    editor3.apply(later, tok, reqs[2:])
    got = editor3.adapter(later).state_dict()
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-5), k


def test_lightning_variant_learns_the_batch(tiny_testbed):
    model = copy.deepcopy(tiny_testbed.model)
    tok, recs = tiny_testbed.tokenizer, tiny_testbed.dataset.records[:4]
    editor = editor_class("coachhook")({**CFG, "update": "lightning",
                                                  "train": {"lr": 0.01, "max_steps": 120, "aux_factor": 1.0, "kl_factor": 0.0}})
    run = run_mode(editor, model, tok, recs, "batch", 4, progress=False)
    assert run.current["cf_efficacy_mag"] > run.pre["cf_efficacy_mag"] + 0.05
    assert run.batches[0]["seconds"] > 0 and attached(model) == []


def test_bfloat16_base_hooks_compute_in_its_precision_and_every_edit_prompt_fires(tiny_testbed):
    model = copy.deepcopy(tiny_testbed.model).to(torch.bfloat16)
    tok, recs = tiny_testbed.tokenizer, tiny_testbed.dataset.records[:3]
    editor = editor_class("coachhook")(CFG)
    editor.apply(model, tok, [r.request for r in recs])
    adapter = editor.adapter(model)
    k = torch.randn(2, 3, adapter.base_info["intermediate_size"], dtype=torch.bfloat16)
    assert adapter.layers["0"].change(k).dtype == torch.bfloat16  # no float32 product beside a bf16 model
    ids = tok([r.request.text for r in recs], add_special_tokens=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hooked = model(**ids).logits
        with adapter.disabled():
            bare = model(**ids).logits
    changed = ((hooked - bare).abs().amax(-1) > 0) & ids["attention_mask"].bool()  # (B, T)
    assert changed.any(1).all()  # the scope gate opens somewhere in every edit prompt


def test_fact_token_alpha_rule_opens_the_gate_where_the_keys_were_written(tiny_testbed):
    model = copy.deepcopy(tiny_testbed.model)
    tok, reqs = tiny_testbed.tokenizer, [r.request for r in tiny_testbed.dataset.records[:4]]
    editor = editor_class("coachhook")({**CFG, "fact_token": "subject_last", "alpha_rule": "fact_token"})
    result = editor.apply(model, tok, reqs)
    adapter = editor.adapter(model)
    stats = edit_scope_stats(model, tok, adapter, reqs, "subject_last")  # (N,) per layer
    for key, layer in adapter.layers.items():
        at_fact = stats[key]["z"]  # z at the subject's last token
        assert float(layer.alpha) == min(2.2, float(at_fact.min()))  # α: the smallest fact-token z-score
        assert (at_fact >= layer.alpha).all()  # so the gate (z >= α) is open at every edit's fact token
        assert (at_fact <= stats[key]["peak"]).all()
    # a second batch: α is set layer by layer, each layer's z-scores read with the earlier layers' new thresholds,
    # so the same statistics recomputed afterwards give exactly the thresholds the editor set
    before = {key: float(layer.alpha) for key, layer in adapter.layers.items()}
    more = [r.request for r in tiny_testbed.dataset.records[4:8]]
    editor.apply(model, tok, more)
    for key, st in edit_scope_stats(model, tok, adapter, more, "subject_last").items():
        assert float(adapter.layers[key].alpha) == min(before[key], float(st["z"].min()))
    result.restore()
    assert attached(model) == []


def test_rounds_are_further_recursive_updates_and_need_the_closed_form(tiny_testbed):
    tok, reqs = tiny_testbed.tokenizer, [r.request for r in tiny_testbed.dataset.records[:3]]
    traces = {}
    for rounds in (1, 2):
        model = copy.deepcopy(tiny_testbed.model)
        editor = editor_class("coachhook")({**CFG, "rounds": rounds})
        result = editor.apply(model, tok, reqs)
        assert result.info["rounds"] == rounds
        traces[rounds] = float(editor.adapter(model).layers["0"].cov.trace())
    assert traces[2] > 1.5 * traces[1]  # the batch's keys entered Σ K Kᵀ once per round
    with pytest.raises(ConfigError, match="'rounds'"):
        editor_class("coachhook")({**CFG, "update": "lightning", "rounds": 2})


@pytest.mark.parametrize("later", ["forced", "gated"])
def test_later_rounds_run_with_hooks_forced_or_through_the_opened_gate(tiny_testbed, monkeypatch, later):
    import memoe.editors.closed_form.core as core

    model = copy.deepcopy(tiny_testbed.model)
    tok, reqs = tiny_testbed.tokenizer, [r.request for r in tiny_testbed.dataset.records[:3]]
    seen = []  # per round: (hooks forced?, does every edit prompt pass α at its peak z-score?)
    original = core.batch_targets

    def spy(model, *args, **kwargs):
        adapter = next(a for a in attached(model))
        forced = {layer.force for layer in adapter.layers.values()}
        with torch.no_grad():
            fires = all(bool((st["peak"] >= adapter.layers[k].alpha).all())
                        for k, st in edit_scope_stats(model, tok, adapter, reqs, CFG["fact_token"]).items())
        seen.append((forced, fires))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(core, "batch_targets", spy)
    editor = editor_class("coachhook")({**CFG, "rounds": 3, "v_stop_loss": 0.0, "later_rounds": later})
    assert editor.apply(model, tok, reqs).info["rounds"] == 3
    assert seen[0][0] == {True}  # the first round: the paper's temporary hook, on at every token
    for forced, fires in seen[1:]:
        if later == "forced":
            assert forced == {True}
        else:  # the scope gate decides, and α was lowered first so that every edit prompt fires
            assert forced == {False} and fires
