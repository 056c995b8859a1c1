"""KN: the update is the paper's (old answer's output embedding out, new one's in, in the found neurons' value
vectors) and it moves the model toward the new answer. Restore, configs and modes are tested for every editor in
test_base.py and test_config.py."""

import torch

from memoe.data.records import EditRequest
from memoe.editors import make_editor
from memoe.editors.kn import KNEditor
from memoe.locate import KNOptions, answer_token, knowledge_neurons
from memoe.models.arch import model_parts


def request(testbed, i=0) -> EditRequest:
    return testbed.dataset.records[i].request


def prob(model, tok, text, token):
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids).logits[0, -1], -1)[token].item()


def test_the_delta_is_the_papers_update_in_the_found_neurons(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    reqs = [request(tiny_testbed, 0), request(tiny_testbed, 1)]
    editor = KNEditor({"steps": 6, "write_scale": 3.0, "erase_scale": 0.5})
    deltas, info = editor.compute_deltas(model, tok, reqs)
    parts = model_parts(model)
    emb = model.get_output_embeddings().weight.detach()
    expected, counts = {}, []
    for r in reqs:  # each request located on the unedited model, independently of the editor
        old, new = answer_token(tok, r.target_true), answer_token(tok, r.target_new)
        found = knowledge_neurons(model, tok, [r.text], old, None, KNOptions(steps=6))
        assert found.neurons
        counts.append(len(found.neurons))
        for layer, i, _, activation in found.neurons:
            d = expected.setdefault(layer, torch.zeros(parts.down_proj_weight(layer).shape))
            d[:, i] += (3.0 * emb[new] - 0.5 * emb[old]) * (1 if activation >= 0 else -1)
    assert sorted(deltas) == sorted(parts.name("down_proj", l) + ".weight" for l in expected)
    for layer, d in expected.items():
        assert torch.allclose(deltas[parts.name("down_proj", layer) + ".weight"], d, atol=1e-6)
    assert info["neurons"] == sum(counts) / 2 and sum(info["neurons_per_layer"].values()) == sum(counts)


def test_an_edit_moves_the_prediction_toward_the_new_answer_and_max_neurons_caps_it(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    r = request(tiny_testbed, 2)
    new = answer_token(tok, r.target_new)
    before = prob(model, tok, r.text, new)
    result = make_editor("kn", overrides={"steps": 6}).apply(model, tok, [r])
    after = prob(model, tok, r.text, new)
    assert after > 5 * before
    result.restore()
    capped, _ = KNEditor({"steps": 6, "max_neurons": 1}).compute_deltas(model, tok, [r])
    assert sum(int(d.abs().sum(0).gt(0).sum()) for d in capped.values()) == 1  # columns (neurons) changed


def test_a_request_without_a_true_target_erases_the_models_own_answer(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    r = request(tiny_testbed, 3)
    ids = torch.tensor([tok(r.text, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        greedy = model(input_ids=ids).logits[0, -1].argmax().item()
    bare = EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_new)
    deltas, _ = KNEditor({"steps": 4, "write_scale": 0.0}).compute_deltas(model, tok, [bare])
    e = model.get_output_embeddings().weight.detach()[greedy]
    columns = [d[:, j] for d in deltas.values() for j in torch.nonzero(d.abs().sum(0)).flatten().tolist()]
    assert columns and all(torch.allclose(c, -e) or torch.allclose(c, e) for c in columns)  # +-: the activation's sign
