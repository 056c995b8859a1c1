import pytest
import torch

from memoe.errors import CacheError
from memoe.retrieval import HEAD, EditIndex, ModelEncoder, SentenceEncoder, in_context_prompt, packaged_minilm


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder()


def test_the_prompt_is_ltes_template():
    assert in_context_prompt("Q is", []) == "Q is"
    one = in_context_prompt("The mother tongue of X is", ["The mother tongue of X is English"])
    assert one == ("Please acknowledge the updated information provided below and respond to the subsequent query.\n\n"
                   "[Updated Information]:\nThe mother tongue of X is English\n\n[Query]:\nThe mother tongue of X is")
    two = in_context_prompt("Q", ["a b", "c d"])
    assert two == f"{HEAD}1. a b\n2. c d\n\n[Query]:\nQ"


def test_retrieval_finds_the_edit_of_a_paraphrase(minilm):
    statements = ["The mother tongue of Danielle Darrieux is English", "Toko Yasuda plays the piano",
                  "The capital of Norway is Bergen", "Apple A5 is produced by Google", "Thomas Ong was born in Oslo"]
    index = EditIndex()
    index.add(minilm.encode([s.rsplit(" ", 1)[0] for s in statements]), statements)  # keys: the prompts
    queries = ["Danielle Darrieux, a native speaker of", "Which instrument does Toko Yasuda play? The",
               "Norway's capital city is", "Who manufactures the Apple A5?", "Thomas Ong's birthplace is"]
    assert [hits[0] for hits in index.search(minilm.encode(queries))] == [0, 1, 2, 3, 4]
    assert index.search(minilm.encode(queries[:1]), k=2)[0][0] == 0 and len(index.search(minilm.encode(queries[:1]), k=2)[0]) == 2


def test_threshold_leaves_an_unrelated_query_without_a_statement(minilm):
    index = EditIndex()
    index.add(minilm.encode(["The mother tongue of Danielle Darrieux is"]), ["The mother tongue of Danielle Darrieux is English"])
    q = minilm.encode(["The mother tongue of Danielle Darrieux is", "Photosynthesis happens in the"])
    assert index.search(q) == [[0], [0]]  # the paper: the top-1 whatever it is
    assert index.search(q, threshold=0.5) == [[0], []]


def test_the_index_truncates_saves_and_checks_its_keys(tmp_path):
    index = EditIndex()
    index.add(torch.eye(4)[:2], ["a", "b"])
    index.add(torch.eye(4)[2:3], ["c"])
    with pytest.raises(ValueError, match="width"):
        index.add(torch.ones(1, 3), ["d"])
    stored = index.save(tmp_path)
    back = EditIndex.load(tmp_path, stored)
    assert back.texts == ["a", "b", "c"] and torch.equal(back.keys, index.keys)
    index.truncate(1)
    assert index.texts == ["a"] and index.keys.shape == (1, 4) and index.search(torch.eye(4)[2:3]) == [[0]]
    (tmp_path / stored["keys_file"]).write_bytes((tmp_path / stored["keys_file"]).read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(CacheError, match="damaged"):
        EditIndex.load(tmp_path, stored)


def test_the_packaged_encoder_is_checked_and_rebuilt_when_damaged(tmp_path):
    folder = packaged_minilm(tmp_path)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert packaged_minilm(tmp_path) == folder and weights.read_bytes() == good


def test_the_base_model_encoder_gives_unit_rows(tiny_testbed):
    enc = ModelEncoder(tiny_testbed.model, tiny_testbed.tokenizer, batch_size=2)
    x = enc.encode(["Meli Sugi plays the", "Meli Sugi plays the", "Podru Muzu was born in"])
    assert x.shape == (3, tiny_testbed.model.config.hidden_size)
    assert torch.allclose(x.norm(dim=1), torch.ones(3), atol=1e-5) and torch.allclose(x[0], x[1], atol=1e-6)
