"""The Python API, used only through `import retro`: build a database, precompute neighbours,
train, load, evaluate, generate, and retrofit a (tiny, local) Hugging Face model."""
import torch

import retro
from tests.helpers.retrieval_helpers import write_corpus

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}


def test_the_whole_pipeline_through_the_package(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=8, words=330)
    db = retro.build_database(retro.BuildOptions(corpus=str(corpus), out=str(tmp_path / "db"), vocab_size=300,
                                                 chunk_size=16, block_size=256, valid_fraction=0.25, progress=False),
                              log=lambda *_: None)
    retro.compute_neighbours(db, k=2, extra=2, progress=False, log=lambda *_: None)
    run = retro.train(retro.TrainOptions(db=str(db), out=str(tmp_path / "run"), steps=3, batch_size=2, seq_chunks=2,
                                         save_every=3, overrides=dict(SMALL), progress=False, device="cpu"),
                      log=lambda *_: None)
    model, state = retro.load_model(run, device="cpu")
    assert isinstance(model, retro.RetroModel) and isinstance(model.cfg, retro.RetroConfig) and state["step"] == 3
    retriever = retro.Retriever.load(db)
    res = retro.evaluate(model, retriever, k=2, progress=False)
    assert isinstance(res, retro.EvalResult) and res.bpb_on > 0 and res.bpb_off > 0
    gen = retro.generate(model, retriever, ["alpha beta"], max_new_tokens=20, temperature=0, k=3)
    assert isinstance(gen[0], retro.Generation) and len(gen[0].tokens) == 20 and gen[0].retrieved
    assert retro.preset("tiny").dim == 128 and "172M" in retro.PRESETS


def test_retrofit_through_the_package():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)).eval()
    model = retro.retrofit(hf, chunk_size=4, encoder=dict(dim=16, head_dim=8))
    assert isinstance(model, retro.RetrofittedLM)
    tokens = torch.randint(0, 100, (1, 9))
    nb, mask = torch.randint(0, 100, (1, 2, 2, 8)), torch.ones(1, 2, 2, 8, dtype=torch.bool)
    torch.testing.assert_close(model(tokens, nb, mask), hf(tokens).logits)
    model.train()
    assert not model.base.training and model.encoder.training  # the frozen base stays in eval mode
