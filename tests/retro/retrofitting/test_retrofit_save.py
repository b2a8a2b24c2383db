"""A saved retrofit holds its new weights only: no tensor of the frozen base (by name, aliases
included, or by storage), a file at most 1.1x the bytes of the trainable tensors, and a round
trip (retro.from_pretrained, RetrofittedLM.from_pretrained) that gives back every trainable tensor
and the logits bit for bit."""
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import retro
from retro import RetroError, RetrofittedLM

LLAMA = dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture
def saved(tmp_path):
    """A retrofitted random Llama (its base saved to tmp_path/base), its new weights made non-zero,
    saved to tmp_path/saved."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "base")
    model = retro.retrofit(str(tmp_path / "base"), cca_layers=(2, 5), encoder={"dim": 64, "depth": 1, "head_dim": 32},
                           k=2, chunk_size=4, backend="reference").eval()
    with torch.no_grad():  # CCA reads its neighbours (its output projection starts at zero)
        for p in model.trainable_state_dict().values():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"


def base_names(model) -> set[str]:
    """Every name under which a module of `model` reaches a tensor of the base, aliases included."""
    base = {t.untyped_storage().data_ptr() for t in model.base.state_dict().values()}
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is not None and t.untyped_storage().data_ptr() in base:
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def test_the_file_holds_the_new_weights_only(saved):
    model, folder = saved
    trainable = model.trainable_state_dict()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        in_file = {k: f.get_tensor(k) for k in f.keys()}
    assert set(in_file) == set(trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not set(in_file) & base_names(model)  # no base tensor by name, the base's own or an alias
    base = {t.untyped_storage().data_ptr() for t in model.base.state_dict().values()}
    assert not [k for k, t in trainable.items() if t.untyped_storage().data_ptr() in base]  # nor by storage
    base_tensors = list(model.base.state_dict().values())
    assert not [k for k, t in in_file.items()  # nor by content
                if any(b.shape == t.shape and torch.equal(b, t) for b in base_tensors)]
    new_bytes = sum(t.numel() * t.element_size() for t in trainable.values())
    size = (folder / "model.safetensors").stat().st_size
    assert size <= 1.1 * new_bytes, f"model.safetensors is {size} bytes for {new_bytes} bytes of new weights"


def test_the_round_trip_is_bit_identical(saved):
    model, folder = saved
    g = torch.Generator().manual_seed(1)
    tokens, nb = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 4, 2, 8), generator=g)
    for loaded in (retro.from_pretrained(folder, device="cpu"), RetrofittedLM.from_pretrained(folder, device="cpu")):
        assert isinstance(loaded, RetrofittedLM)
        mine, theirs = model.trainable_state_dict(), loaded.trainable_state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        with torch.no_grad():
            assert torch.equal(loaded(tokens, nb), model(tokens, nb))
            assert not torch.equal(loaded(tokens, nb), loaded(tokens))  # the neighbours matter


def test_retrofitted_from_pretrained_refuses_a_retro_model(tmp_path):
    cfg = retro.preset("tiny", dim=32, ff_dim=64, heads=2, head_dim=16, enc_dim=32, enc_heads=2, enc_head_dim=16,
                       depth=2, cca_layers=[1], vocab_size=97, chunk_size=4, max_seq_len=32)
    retro.RetroModel(cfg).save_pretrained(tmp_path / "plain")
    assert isinstance(retro.from_pretrained(tmp_path / "plain", device="cpu"), retro.RetroModel)
    with pytest.raises(RetroError, match="not a retrofitted model"):
        RetrofittedLM.from_pretrained(tmp_path / "plain", device="cpu")
