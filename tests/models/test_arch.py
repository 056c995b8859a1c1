import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from memoe.models import ARCHITECTURES, UnknownArchitectureError, llama3_mini_config, load_model, model_parts


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama3_mini_config(vocab_size=300, hidden_size=64, layers=3)).eval()


def test_llama3_mini_has_llama3_features(mini):
    cfg = mini.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert not cfg.tie_word_embeddings and mini.lm_head.weight.data_ptr() != mini.model.embed_tokens.weight.data_ptr()
    assert mini.model.rotary_emb.rope_type == "llama3"


def test_table_resolves_every_module_on_llama3_mini(mini):
    p = model_parts(mini)
    assert p.num_layers == 3
    assert p.name("down_proj", 1) == "model.layers.1.mlp.down_proj"
    assert p.module("down_proj", 2) is mini.model.layers[2].mlp.down_proj
    assert p.module("mlp", 0) is mini.model.layers[0].mlp
    assert p.module("attn", 0) is mini.model.layers[0].self_attn
    assert p.module("embed") is mini.model.embed_tokens
    assert p.module("final_norm") is mini.model.norm
    assert p.module("lm_head") is mini.lm_head
    assert p.layer(-1) is mini.model.layers[2]
    assert p.down_proj_weight(0).shape == (64, mini.config.intermediate_size)


def test_layer_out_of_range_is_named(mini):
    with pytest.raises(IndexError, match="layer 7 out of range: the model has 3 layers"):
        model_parts(mini).module("down_proj", 7)


def test_gpt2_conv1d_is_transposed():
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    p = model_parts(m)
    assert p.down_proj_weight(1).shape == (32, 128)  # (out=hidden, in=intermediate) whatever the storage


def test_unknown_architecture_says_how_to_add_it():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(UnknownArchitectureError, match="register_architecture\\('oddformer'"):
        model_parts(Odd())


def test_known_architectures():
    assert {"llama", "mistral", "qwen2", "gpt2", "gptj"} <= set(ARCHITECTURES)


def test_load_model_from_local_directory(tmp_path, mini):
    from memoe.testbed.build import train_tokenizer

    tok = train_tokenizer(["Ada was born in Paris.", "Bob speaks Welsh."] * 10, 300)
    mini.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tok2("Ada was born in")["input_ids"]])
    assert torch.equal(model(ids).logits, mini(ids).logits)
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))


def test_random_llama3_8b_has_the_real_shapes_and_is_built_in_the_asked_dtype():
    from memoe.models import random_model

    big = random_model("llama3-8b", torch.bfloat16, "meta")  # shapes only: nothing allocated
    assert sum(p.numel() for p in big.parameters()) == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert model_parts(big).down_proj_weight(1).shape == (4096, 14336)
    mini = random_model("llama3-mini", torch.bfloat16)
    assert {p.dtype for p in mini.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in mini.parameters())
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    with pytest.raises(KeyError, match="llama3-8b"):
        random_model("llama3-70b")
