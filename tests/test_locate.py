"""Knowledge-neuron attribution: the batched, cached IG against a step-by-step reference, completeness, and a
hand-built model whose answer is carried by one known neuron."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memoe import nethook
from memoe.locate import KNOptions, coarse_neurons, integrated_gradients, knowledge_neurons, reference_integrated_gradients
from memoe.models.arch import model_parts


def tiny_llama(seed=0, layers=3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def test_batched_cached_ig_equals_a_step_by_step_reference():
    model = tiny_llama()
    ids, answer = [1, 7, 3, 12, 5, 9], 11
    # max_rows=7 splits the 3 layers x 5 steps into passes of one layer, 15 rows in one pass: both agree.
    for max_rows in (7, 64):
        scores, p, _ = integrated_gradients(model, ids, answer, [0, 1, 2], steps=5, max_rows=max_rows)
        for j, layer in enumerate([0, 1, 2]):
            ref = reference_integrated_gradients(model, ids, answer, layer, 5)
            assert torch.allclose(scores[j], ref, atol=1e-7, rtol=1e-4), (max_rows, layer)
    assert p == pytest.approx(torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[answer].item(), abs=1e-6)


def test_a_layers_attributions_add_up_to_the_probability_it_carries():
    """Completeness: sum_i Attr_i = P(a) - P(the layer's activations zeroed), up to the Riemann error."""
    model = tiny_llama(seed=1)
    ids = [2, 9, 4, 17]
    with torch.no_grad():
        answer = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    scores, p, _ = integrated_gradients(model, ids, answer, [0, 1, 2], steps=400)
    for layer in range(3):
        def zero_last(m, args):
            inp = args[0].clone()
            inp[0, -1] = 0
            return (inp,)

        with torch.no_grad(), nethook.hooks(model, pre={model_parts(model).name("down_proj", layer): zero_last}):
            p0 = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[answer].item()
        assert abs(p - p0) > 0.01  # the check means something
        assert scores[layer].sum().item() == pytest.approx(p - p0, rel=0.01)


def one_neuron_model(ids, neuron=5, layer=1, answer=13):
    """A model whose answer on ``ids`` is written by one neuron: layer ``layer``'s down-projection is zero except
    that neuron's value vector, which points at the answer's output embedding; the neuron's gate and up rows
    read the MLP's input at the prompt's last token, so it fires there; the other layers' MLPs are damped."""
    model = tiny_llama(seed=2)
    parts = model_parts(model)
    mlp = parts.module("mlp", layer)
    with torch.no_grad():
        for l in range(parts.num_layers):
            parts.module("down_proj", l).weight.mul_(0.05)
        mlp.down_proj.weight.zero_()
        e = model.lm_head.weight[answer]
        mlp.down_proj.weight[:, neuron] = 3.0 * e / e.norm()
        with nethook.capture(model, [parts.name("mlp", layer)], inputs=True) as seen:
            model(input_ids=torch.tensor([ids]))
        x = seen[parts.name("mlp", layer)][0, -1]
        mlp.gate_proj.weight[neuron] = 3.0 * x / x.norm() ** 2  # gate = up = 3 on this input
        mlp.up_proj.weight[neuron] = 3.0 * x / x.norm() ** 2
    return model


def test_the_neuron_that_carries_the_answer_ranks_first():
    neuron, layer, answer, ids = 5, 1, 13, [1, 4, 8, 2]
    model = one_neuron_model(ids, neuron, layer, answer)
    scores, p, acts = integrated_gradients(model, ids, answer, [0, 1, 2], steps=20)
    flat = scores.flatten().argmax().item()
    assert divmod(flat, scores.shape[1]) == (layer, neuron)
    assert p > 0.2  # the neuron makes the answer likely
    others = scores.clone()
    others[layer, neuron] = 0
    assert scores[layer, neuron] > 5 * others.abs().max()
    assert coarse_neurons(scores, [0, 1, 2], 0.2)[(layer, neuron)] == (layer, neuron)
    assert acts[layer, neuron] == pytest.approx(9.0 * torch.sigmoid(torch.tensor(3.0)).item(), rel=1e-4)  # silu(3) * 3


def test_refinement_keeps_neurons_shared_by_the_prompts(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    record = tiny_testbed.dataset.records[0]
    r = record.request
    answer = tok(" " + r.target_true, add_special_tokens=False)["input_ids"][0]
    prompts = [r.text] + list(record.paraphrase_prompts[:2])
    all_votes = knowledge_neurons(model, tok, prompts, answer, opts=KNOptions(steps=8, share=1.0))
    any_vote = knowledge_neurons(model, tok, prompts, answer, opts=KNOptions(steps=8, share=0.0))
    alone = [knowledge_neurons(model, tok, [p], answer, opts=KNOptions(steps=8)) for p in prompts]
    sets = [{(l, i) for l, i, *_ in f.neurons} for f in alone]
    assert set.intersection(*sets) != set.union(*sets)  # the prompts disagree: the vote decides something
    assert {(l, i) for l, i, *_ in all_votes.neurons} == set.intersection(*sets)
    assert {(l, i) for l, i, *_ in any_vote.neurons} == set.union(*sets)
    assert all_votes.coarse == [len(s) for s in sets]
    scores = [n[2] for n in any_vote.neurons]
    assert scores == sorted(scores, reverse=True)
