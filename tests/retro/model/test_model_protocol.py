"""One model contract: RetroModel and RetrofittedLM both satisfy the Protocol RetrievalLM
(python/retro/model/protocol.py) that training, decoding, evaluation and saving use instead of
probing the classes with hasattr/getattr."""
import typing

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import retro
from retro.model.protocol import RetrievalLM

LLAMA = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def models():
    torch.manual_seed(0)
    plain = retro.RetroModel(retro.preset("tiny", vocab_size=100, depth=2, cca_layers=(1,), chunk_size=4,
                                          max_seq_len=16))
    fitted = retro.retrofit(LlamaForCausalLM(LlamaConfig(**LLAMA)), cca_layers=(1,),
                            encoder={"dim": 32, "depth": 1, "head_dim": 16}, k=2, chunk_size=4, backend="reference")
    return plain, fitted


def test_both_models_satisfy_the_protocol():
    members = [m for m in typing.get_type_hints(RetrievalLM)] + [
        m for m, v in vars(RetrievalLM).items() if (callable(v) or isinstance(v, property)) and not m.startswith("_")]
    assert {"forward", "new_state", "prefill", "step", "cca_modules", "fit_copy_prior", "trainable_state_dict",
            "compile_decoding", "supports_checkpointing", "extra_config", "blocks", "encoder"} <= set(members)
    for model in models():
        assert isinstance(model, RetrievalLM), type(model).__name__
        missing = [m for m in members if not hasattr(model, m)]
        assert not missing, (type(model).__name__, missing)


def test_the_contract_answers_the_same_questions_for_both():
    plain, fitted = models()
    assert plain.supports_checkpointing and not fitted.supports_checkpointing
    assert plain.extra_config == {} and set(fitted.extra_config) == {"retrofit"}
    assert set(plain.trainable_state_dict()) == set(plain.state_dict())
    assert not any(k.startswith("base.") for k in fitted.trainable_state_dict())
    assert plain.trained_on is None and fitted.trained_on is None
    for model in (plain, fitted):
        assert sorted(model.cca_modules()) == [1]


def test_each_class_loads_its_own_kind_and_retro_loads_either(tmp_path):
    plain, fitted = models()
    plain.save_pretrained(tmp_path / "plain")
    fitted.save_pretrained(tmp_path / "fitted")
    with pytest.raises(retro.RetroError, match="holds a RetrofittedLM, not a RetroModel"):
        retro.RetroModel.from_pretrained(tmp_path / "fitted", device="cpu")
    with pytest.raises(retro.RetroError, match="holds a RetroModel, not a retrofitted model"):
        retro.RetrofittedLM.from_pretrained(tmp_path / "plain", device="cpu")
    loaded = retro.from_pretrained(tmp_path / "plain", device="cpu")
    assert type(loaded) is retro.RetroModel and loaded.source == str(tmp_path / "plain")
    tokens = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(loaded(tokens), plain.eval()(tokens), rtol=0, atol=0)
