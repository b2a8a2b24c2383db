"""Training data, training (loss goes down), exact resume after a kill, 2-process DDP, evaluation
and generation on a tiny database."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT, free_port, run_cli, write_corpus
from tests.helpers.train_helpers import Stop, stop_at, train_killed_at
from retro.base.defaults import IGNORE
from retro.training.data import TrainSequences
from retro.evaluation.evaluate import evaluate
from retro.decoding.generate import generate
from retro.retrieval import BuildOptions, ChunkDatabase, Retriever, build_database, compute_neighbours
from retro.retrieval.neighbours import load_neighbours
from retro.training.train import TrainOptions, load_model, train

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    corpus = write_corpus(root / "corpus", docs=10, words=330)
    build_database(BuildOptions(corpus=str(corpus), out=str(root / "db"), vocab_size=300, chunk_size=16,
                                block_size=256, valid_fraction=0.2, progress=False), log=lambda *_: None)
    compute_neighbours(root / "db", k=2, extra=6, progress=False, log=lambda *_: None)
    return root / "db"


def opts(db, out, **kw):
    base = dict(db=str(db), out=str(out), steps=12, batch_size=4, seq_chunks=4, lr=3e-3, warmup=2, save_every=4,
                overrides=dict(SMALL), progress=False, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_sequences_mask_padding_and_exclude_their_documents(db):
    d = ChunkDatabase(db)
    seqs = TrainSequences(d, 4, 2, load_neighbours(db, 8))
    for i in range(len(seqs)):
        tokens, targets, nb, mask = seqs.sequence(i)
        chunks = np.arange(i * 4, i * 4 + 4)
        docs = set(d.chunk_doc[chunks].tolist())
        assert tokens.shape == (64,) and nb.shape == (4, 2, 32)
        for j, c in enumerate(chunks):
            n = d.chunk_len[c]
            assert np.array_equal(tokens[j * 16: j * 16 + n], d.chunk_tokens(c))
            assert (targets[j * 16 + n - 1: j * 16 + 16] == IGNORE).all() or n == 16
        ids = np.asarray(seqs.candidates[chunks])  # what the sequence kept came from other documents
        kept = [c for c in ids.reshape(-1) if c >= 0 and d.chunk_doc[c] not in docs]
        assert mask.any() and len(kept) >= 1
        # a neighbour token block equals one of the kept candidates' values
        vals, _ = d.values(np.array(kept[:1]))
        assert any(np.array_equal(vals[0], nb[j, r]) for j in range(4) for r in range(2))


def test_a_sequence_longer_than_the_database_is_a_user_error(db, tmp_path, capsys):
    from retro.app.cli import main

    chunks = ChunkDatabase(db).num_chunks
    assert main(["train", "--db", str(db), "--out", str(tmp_path / "run"), "--seq-chunks", str(chunks + 1),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"retro train: error: --seq-chunks {chunks + 1} is longer than the whole "
                                       f"database ({chunks} chunks): expected at most {chunks}, or a larger corpus\n")
    assert main(["train", "--db", str(db), "--out", str(tmp_path / "run"), "--set", "cca_layers=[9]", "--set",
                 "depth=2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cca_layers must be non-empty 0-based layer indices < depth=2, got (9,)" in err, err


@pytest.mark.slow
def test_training_lowers_loss_and_resumes_exactly(db, tmp_path):
    train(opts(db, tmp_path / "full", overrides={**SMALL, "dropout": 0.1}), log=lambda *_: None)
    full = losses(tmp_path / "full")
    assert len(full) == 12 and np.mean(full[-3:]) < np.mean(full[:3])
    args = ["train", "--db", str(db), "--out", str(tmp_path / "killed"), "--steps", "12", "--batch-size", "4",
            "--seq-chunks", "4", "--lr", "3e-3", "--warmup", "2", "--save-every", "4", "--device", "cpu",
            "--no-progress"]
    args += [x for k, v in {**SMALL, "dropout": 0.1}.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    killed = train_killed_at(10, *args[1:])
    assert killed.returncode == -signal.SIGKILL and "SIGKILL before step 10" in killed.stderr, killed.stderr[-2000:]
    assert len(losses(tmp_path / "killed")) == 10  # the log holds steps 1-10; the checkpoint is step 8's
    again = run_cli(*args, check=False)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    bad = run_cli(*args[:-2], "--set", "dim", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "--set expects FIELD=VALUE, got 'dim'" in bad.stderr
    run_cli(*args, "--resume")
    assert losses(tmp_path / "killed") == full  # the resumed curve is the uninterrupted one, bit for bit


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(db, tmp_path):
    train(opts(db, tmp_path / "one", steps=3), log=lambda *_: None)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["train", "--db", str(db), "--out", str(tmp_path / "two"), "--steps", "3", "--batch-size", "4",
            "--seq-chunks", "4", "--lr", "3e-3", "--warmup", "2", "--save-every", "4", "--device", "cpu",
            "--no-progress"] + [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "retro", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    a, _ = load_model(tmp_path / "one", device="cpu")
    b, _ = load_model(tmp_path / "two", device="cpu")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        # atol: the encoder's feed-forward sits behind a zero-initialised output projection (the
        # copy prior), so its first gradients are near zero, where Adam's normalisation turns
        # summation-order rounding into steps of up to ~1e-3 x lr (measured 2.8e-6 at lr 3e-3)
        diff = (p - q).abs().max().item()
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{name}: max |diff| {diff:.2e}")


@pytest.mark.slow
def test_evaluate_and_generate(db, tmp_path):
    train(opts(db, tmp_path / "run", steps=4), log=lambda *_: None)
    model, state = load_model(tmp_path / "run", device="cpu")
    retriever = Retriever.load(db)
    res = evaluate(model, retriever, k=2, progress=False)
    valid = retriever.db.documents("valid")
    first = sum(len(retriever.db.tokenizer.decode(retriever.db.document_tokens(d)[:1]).encode()) for d in valid)
    assert res.documents == 2 and res.bytes == int(retriever.db.doc_bytes[valid].sum()) - first
    assert res.bpb_on > 0 and res.bpb_off > 0 and res.bpb_on != res.bpb_off
    # RETRO[OFF] by hand: the same windows, no neighbours
    nll = 0.0
    for d in retriever.db.documents("valid"):
        t = torch.tensor(retriever.db.document_tokens(d), dtype=torch.long)
        for s in range(0, len(t) - 1, model.cfg.max_seq_len):
            x, y = t[s:s + model.cfg.max_seq_len], t[s + 1:s + model.cfg.max_seq_len + 1]
            nll += torch.nn.functional.cross_entropy(model(x[None][:, :len(y)])[0], y, reduction="sum").item()
    assert res.bpb_off == pytest.approx(nll / np.log(2) / res.bytes, rel=1e-5)

    prompts = ["alpha beta gamma delta", "river stone cloud forest engine planet signal vector matrix kernel"]
    both = generate(model, retriever, prompts, max_new_tokens=24, temperature=0, seed=0)
    alone = [generate(model, retriever, [p], max_new_tokens=24, temperature=0)[0] for p in prompts]
    assert [g.tokens for g in both] == [g.tokens for g in alone]  # batching prompts changes nothing
    assert all(len(g.tokens) == 24 for g in both) and any(g.retrieved for g in both)
    s1 = generate(model, retriever, prompts[:1], max_new_tokens=16, temperature=1.0, seed=3)[0].tokens
    s2 = generate(model, retriever, prompts[:1], max_new_tokens=16, temperature=1.0, seed=3)[0].tokens
    assert s1 == s2

    out = run_cli("generate", str(tmp_path / "run"), "alpha beta", "--db", str(db), "--max-new-tokens", "40",
                  "--show-neighbours").stdout
    assert out.startswith("alpha beta") and "neighbour 0: id" in out
    off = run_cli("generate", str(tmp_path / "run"), "alpha beta", "--db", str(db), "--max-new-tokens", "8",
                  "--no-retrieval", "--temperature", "0").stdout
    assert off.startswith("alpha beta")
    report = json.loads(run_cli("evaluate", str(tmp_path / "run"), "--db", str(db)).stdout)
    assert report["bpb_off"] == pytest.approx(res.bpb_off, rel=1e-6) and report["tokens"] == res.tokens


@pytest.mark.slow
def test_overlap_report(db, tmp_path):
    from retro.evaluation.overlap import overlap_report

    train(opts(db, tmp_path / "run", steps=3), log=lambda *_: None)
    model, _ = load_model(tmp_path / "run", device="cpu")
    retriever = Retriever.load(db)
    rows = overlap_report(model, retriever, k=2, out=str(tmp_path / "report"), log=lambda *_: None, progress=False)
    assert [r["alpha"] for r in rows] == [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]
    tokens = [r["tokens"] for r in rows]
    assert tokens == sorted(tokens) and rows[-1]["fraction"] == 1.0  # every scored token has r(C) <= 1
    full = evaluate(model, retriever, k=2, progress=False)
    assert rows[-1]["tokens"] == full.tokens and rows[-1]["RETRO[ON]"] == pytest.approx(full.bpb_on, rel=1e-9)
    assert rows[-1]["RETRO[OFF]"] == pytest.approx(full.bpb_off, rel=1e-9)
    assert all(r["RETRO[ON]"] > 0 and r["RETRO[OFF]"] > 0 for r in rows if r["tokens"])
    for name in ("overlap.json", "overlap.md", "overlap.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    out = run_cli("evaluate", str(tmp_path / "run"), "--db", str(db), "--overlap", "--overlap-out",
                  str(tmp_path / "cli")).stdout
    assert "| 1.0 |" in out and json.loads((tmp_path / "cli" / "overlap.json").read_text())["rows"] == rows


@pytest.mark.slow
@pytest.mark.slow
def test_activation_checkpointing_recomputes_and_changes_nothing(db, tmp_path, monkeypatch):
    """With checkpointing every decoder layer runs twice per training step (forward, then again in
    the backward pass), and the losses are bit for bit those without it."""
    import retro.model.model

    calls = []
    layer = retro.model.model.DecoderLayer.forward
    monkeypatch.setattr(retro.model.model.DecoderLayer, "forward",
                        lambda self, *a, **kw: calls.append(1) or layer(self, *a, **kw))
    train(opts(db, tmp_path / "plain", steps=3), log=lambda *_: None)
    plain = len(calls)
    calls.clear()
    train(opts(db, tmp_path / "ckpt", steps=3, checkpointing=True), log=lambda *_: None)
    assert plain == 3 * (SMALL["depth"] + 1) and len(calls) == 2 * plain
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes(db, tmp_path, monkeypatch):
    """`train --compile`: the model traced as one graph, forward and backward (a tracing-only
    backend: inductor's C++ build takes minutes on 2 cores). Per-step losses stay within 1e-5 of
    eager's: about 20 float32 ulps at a loss of 5.7, where test_compile.py measures eager float32's
    own error against float64 at about 1 ulp per step. A compiled run killed at step 3 resumes
    (the optimizer's fused setting is re-applied on load) onto the same curve."""
    kw = dict(steps=4, save_every=2)
    train(opts(db, tmp_path / "eager", **kw), log=lambda *_: None)
    compiled = opts(db, tmp_path / "compiled", compile=True, compile_backend="aot_eager_decomp_partition", **kw)
    with pytest.raises(Stop, match="stopped before step 3"), stop_at(3):
        train(compiled, log=lambda *_: None)
    compiled.resume = True
    train(compiled, log=lambda *_: None)
    torch._dynamo.reset()
    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled_losses) == 4
    diff = np.abs(np.array(compiled_losses) - np.array(eager_losses)).max()
    assert diff <= 1e-5, f"largest |compiled - eager| loss {diff:.2e}: {compiled_losses} vs {eager_losses}"


def test_compile_backend_is_checked(tmp_path):
    from retro.base.errors import RetroError

    with pytest.raises(RetroError, match="compile_backend must be one of inductor, .*got 'xla'"):
        opts(tmp_path, tmp_path / "run", compile_backend="xla").validate()


def test_time_budget_is_re_estimated_from_recent_speed():
    from retro.training.train import budget_steps

    # a slow start (3 s/step) then 1 s/step: the length follows the recent speed, not the first steps
    times = [5.0] + [3.0] * 4 + [1.0] * 20
    assert budget_steps(25, 37.0, times, 180.0, 10_000) == 25 + 143
    assert budget_steps(5, 17.0, times[:5], 180.0, 10_000) == 5 + 54
    assert budget_steps(25, 200.0, times, 180.0, 10_000) == 26  # over budget: stop at the next step
    assert budget_steps(25, 37.0, times, 180.0, 100) == 100      # never beyond --steps


def test_time_budget_stops_training_near_the_budget(db, tmp_path):
    import time

    t0 = time.perf_counter()
    train(opts(db, tmp_path / "run", steps=100_000, time_budget=4.0, save_every=100_000))
    seconds = time.perf_counter() - t0
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == state["total_steps"] < 100_000
    assert seconds < 4.0 + 15.0, f"a 4 s budget trained for {seconds:.1f} s ({state['step']} steps)"


def test_checkpointing_is_refused_for_retrofitted_models(db, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from retro.base.errors import RetroError
    from retro.retrofitting.wrapper import retrofit

    def factory(cfg, database):
        hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=database.tokenizer.vocab_size))
        return retrofit(hf, chunk_size=database.chunk_size, backend="cpu", encoder=dict(dim=24, head_dim=12))

    with pytest.raises(RetroError, match="--checkpointing is not supported"):
        train(opts(db, tmp_path / "run", checkpointing=True), log=lambda *_: None, model_factory=factory)


def retrieval_path_parameters(model, vocab_size, chunk_size, k):
    """The names of model's parameters that only the retrieval path uses, found by running it:
    every parameter gets a gradient from a forward with neighbours, and those left without one by
    a forward without neighbours (RETRO[OFF]) belong to the retrieval path."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (2, 2 * chunk_size), generator=g)
    neighbours = torch.randint(0, vocab_size, (2, 2, k, 2 * chunk_size), generator=g)
    mask = torch.ones(neighbours.shape, dtype=torch.bool)
    model(tokens, neighbours, mask).float().pow(2).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"a forward with neighbours leaves {unused} without a gradient"
    model.zero_grad(set_to_none=True)
    model(tokens).float().pow(2).mean().backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


def test_retrieval_parameters_are_those_of_the_retrieval_path():
    """is_retrieval_parameter (the parameters --retrieval-lr-scale scales) is true exactly for the
    parameters only a forward with neighbours uses: the encoder, its input projection (enc_dim 24
    != dim 32) and input norm, the CCA blocks and their norms; false for the decoder's."""
    from retro.model.model import RetroModel, preset
    from retro.training.train import is_retrieval_parameter

    cfg = preset("tiny", vocab_size=300, chunk_size=8, dim=32, ff_dim=64, heads=2, head_dim=16, enc_dim=24,
                 enc_heads=2, enc_head_dim=12, depth=3, cca_layers=(1, 2), max_seq_len=32, backend="reference",
                 encoder_input_norm=True)
    model = RetroModel(cfg)
    retrieval = retrieval_path_parameters(model, cfg.vocab_size, cfg.chunk_size, cfg.num_neighbours)
    parts = {n.split(".")[0] if not n.startswith("layers.") else n.split(".")[2] for n in retrieval}
    assert parts == {"encoder", "to_encoder", "encoder_in_norm", "cca", "cca_norm"}, parts
    names = [n for n, _ in model.named_parameters()]
    wrong = [n for n in names if is_retrieval_parameter(n) != (n in retrieval)]
    assert not wrong, f"misclassified: {wrong}"
    assert len(retrieval) < len(names)  # the decoder's parameters are there, and not classified


def test_resume_refuses_a_changed_plan(db, tmp_path, capsys):
    """--resume continues a run as it was planned: `train --steps 4`, then `train --steps 8
    --resume` is refused with one line naming both values, and the run is left as it was; with
    the run's own --steps it resumes (here: finished, nothing to do)."""
    from retro.app.cli import main

    args = ["train", "--db", str(db), "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "4",
            "--seq-chunks", "4", "--warmup", "2", "--save-every", "2", "--device", "cpu", "--no-progress"] + \
        [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert main(args) == 0
    state = (tmp_path / "run" / "checkpoint" / "state.json").read_text()
    capsys.readouterr()
    longer = [a if a != "4" or args[i - 1] != "--steps" else "8" for i, a in enumerate(args)]
    assert main(longer + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps 8 differs from the 4" in err and "pass --steps 4" in err, err
    assert (tmp_path / "run" / "checkpoint" / "state.json").read_text() == state
    assert len(losses(tmp_path / "run")) == 4
    assert main(args + ["--resume", "--lr", "0.01"]) == 2
    assert "--lr 0.01 differs from the 0.001" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 4
