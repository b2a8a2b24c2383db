"""save_pretrained / from_pretrained: a folder with config.json, model.safetensors and the tokenizer;
round trips give bit-identical logits; a run folder loads through the same code; bad sources are
named."""
import pytest
import torch

from retro import RetroError
from retro.model.model import RetroModel, preset
from retro.model.saved import load_tokenizer_beside, save_pretrained
from retro.retrofitting.load import from_pretrained

SMALL = dict(dim=32, ff_dim=64, heads=2, head_dim=16, enc_dim=32, enc_heads=2, enc_head_dim=16, depth=2,
             cca_layers=[1], vocab_size=97, chunk_size=4, max_seq_len=32)


def random_model(seed=0) -> RetroModel:
    torch.manual_seed(seed)
    model = RetroModel(preset("tiny", **SMALL)).eval()
    with torch.no_grad():  # non-zero everywhere, CCA's output projection included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (2, 16), generator=g)
    neighbours = torch.randint(0, 97, (2, 4, 2, 8), generator=g)
    return tokens, neighbours


def test_round_trip_gives_bit_identical_logits(tmp_path):
    model = random_model()
    tokens, nb = batch()
    model.save_pretrained(tmp_path / "saved")
    loaded = RetroModel.from_pretrained(tmp_path / "saved", device="cpu")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(loaded(tokens, nb), model(tokens, nb))
        assert not torch.equal(random_model(seed=5)(tokens, nb), model(tokens, nb))  # the test can tell models apart


def test_the_tokenizer_is_saved_beside(tmp_path):
    from retro.retrieval import SentencePieceTokenizer

    text = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 40
    tok = SentencePieceTokenizer.train(text, vocab_size=300, log=lambda *_: None)
    save_pretrained(random_model(), tmp_path / "saved", tokenizer=tok)
    again = load_tokenizer_beside(tmp_path / "saved")
    assert again.sha256 == tok.sha256 and again.encode(text[:1])[0].tolist() == tok.encode(text[:1])[0].tolist()


def test_saving_again_replaces_and_a_foreign_folder_is_refused(tmp_path):
    save_pretrained(random_model(0), tmp_path / "saved")
    save_pretrained(random_model(1), tmp_path / "saved")
    tokens, nb = batch()
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "saved", device="cpu")(tokens, nb), random_model(1)(tokens, nb))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(RetroError, match="holds no saved model"):
        save_pretrained(random_model(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_bad_sources_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RetroError, match="cannot fetch 'nobody/no-such-retro'"):
        from_pretrained("nobody/no-such-retro")
    with pytest.raises(RetroError, match="neither a saved model folder"):
        from_pretrained(str(tmp_path / "missing" / "deeper" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetroError, match="holds no checkpoint"):
        from_pretrained(tmp_path / "empty")


def test_a_retrofit_saves_its_new_weights_and_loads_onto_its_base_only(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from retro.retrofitting.wrapper import retrofit

    def base(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=100, n_positions=128,
                                          bos_token_id=1, eos_token_id=2))

    base(0).save_pretrained(tmp_path / "base")
    model = retrofit(str(tmp_path / "base"), cca_layers=(1, 3), encoder={"dim": 32, "depth": 1, "head_dim": 16},
                     k=2, chunk_size=4, backend="reference").eval()
    with torch.no_grad():  # CCA reads its neighbours (its output projection starts at zero)
        for p in model.trainable_state_dict().values():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 100, (2, 16))
    nb = torch.randint(0, 100, (2, 4, 2, 8))
    save_pretrained(model, tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(model.trainable_state_dict()) and not any(k.startswith("base.") for k in saved)
    loaded = from_pretrained(tmp_path / "saved", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(tokens, nb), model(tokens, nb))
        assert not torch.equal(loaded(tokens, nb), loaded(tokens, None))  # the neighbours matter
    base(1).save_pretrained(tmp_path / "base")  # another model where the base was
    with pytest.raises(RetroError, match="retrofitted onto another"):
        from_pretrained(tmp_path / "saved", device="cpu")
