"""The lm-evaluation-harness model `retro` (retro/evaluation/lm_eval_backend.py) on a tiny trained run: its
loglikelihood is the model's own NLL of the continuation (causal: the neighbours of chunks the
continuation completes change nothing before them), retrieval off is RETRO[OFF], rolling
loglikelihood is the NLL `retro evaluate` sums, generate_until is retro.generate's greedy text
cut at the stop string; and lm-eval itself runs local tasks of all three kinds through its
evaluator and through `retro lm-eval`."""
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import retro  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tests.helpers.retrieval_helpers import quick_database  # noqa: E402
from retro.app.cli import main  # noqa: E402
from retro.base.defaults import IGNORE  # noqa: E402
from retro.evaluation.evaluate import evaluate, prepare  # noqa: E402
from retro.evaluation.lm_eval_backend import RetroLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
M, SEQ = 16, 48  # chunk size, the model's max_seq_len: 3 chunks
SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1], "max_seq_len": SEQ, "backend": "reference"}


@pytest.fixture(scope="module")
def run_db(tmp_path_factory):
    """A run trained 2 steps on a small database (HashingEmbedder for BERT, patched while the
    module's tests run, since the retriever embeds queries with it)."""
    root = tmp_path_factory.mktemp("lmeval")
    with pytest.MonkeyPatch.context() as mp:
        db = quick_database(root, mp)
        run = retro.train(retro.TrainOptions(db=str(db), out=str(root / "run"), steps=2, batch_size=2, seq_chunks=2,
                                             save_every=2, overrides=dict(SMALL), progress=False, device="cpu"),
                          log=lambda *_: None)
        yield run, db


def make_lm(run_db, retrieval="on", **kw) -> RetroLM:
    """The backend in float64, with larger random weights (the same for every call) than 2 steps
    give, so that the neighbours matter."""
    run, db = run_db
    lm = RetroLM(run=str(run), db=str(db), retrieval=retrieval, k=2, device="cpu", **kw)
    gen = torch.Generator().manual_seed(0)
    for p in lm.model.double().parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2
    return lm


def requests(kind, *args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def corpus_text(run_db, doc=1) -> str:
    return (run_db[1].parent / "corpus" / f"doc{doc:03d}.txt").read_text()


def direct_nll(lm, tokens, scored: int, extra=(), retrieval=True):
    """The model's NLL (nats) of the last `scored` of `tokens` (the last SEQ + 1 tokens read),
    computed in one forward pass with targets over tokens + extra (tokens after them, whose
    chunks' neighbours must change nothing before them), and whether each scored token is the argmax."""
    tokens = np.asarray(tokens)[-(SEQ + 1):]
    x = np.concatenate([tokens[:-1], np.asarray(extra, dtype=np.int64)])
    y = np.full(len(x), IGNORE)
    y[len(tokens) - 1 - scored:len(tokens) - 1] = tokens[len(tokens) - scored:]
    nb = mask = None
    if retrieval and len(x) >= M:
        found = lm.retriever.search([x[u * M:(u + 1) * M] for u in range(len(x) // M)], 2)
        nb, mask = torch.as_tensor(found.tokens)[None], torch.as_tensor(found.mask)[None]
    x_t, y_t = torch.as_tensor(x)[None], torch.as_tensor(y)[None]
    with torch.no_grad():
        nll = float(lm.model(x_t, nb, mask, targets=y_t).sum())
        logits = lm.model(x_t, nb, mask)[0]
    keep = y != IGNORE
    return nll, bool((logits.argmax(-1)[keep] == y_t[0, keep]).all())


def pairs_of(run_db):
    """(context, continuation) pairs: inside a chunk, across chunks, longer than the model reads."""
    text = corpus_text(run_db)
    return [(text[:30], text[30:60]), (text[:120], text[120:200]), (text[:400], text[400:470]),
            ("", text[:25]), (text[:90] + " ", text[90:130])]


def tokens_of_pair(lm, context, continuation):
    """The tokens the backend must score, worked out here: the whole text's tokens, the
    continuation's being those after the context's token count (trailing spaces move over)."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = lm.tok.encode([context + continuation])[0]
    n_ctx = len(lm.tok.encode([context])[0])
    if n_ctx == 0:
        return np.concatenate([[lm.tok.eos_id], whole]), len(whole)
    return whole, len(whole) - n_ctx


def test_loglikelihood_is_the_models_nll_of_the_continuation(run_db):
    lm = make_lm(run_db, batch_size=2)
    pairs = pairs_of(run_db)
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    rng = np.random.default_rng(0)
    for (ll, greedy), pair in zip(got, pairs):
        tokens, scored = tokens_of_pair(lm, *pair)
        extra = rng.integers(4, lm.tok.vocab_size, size=2 * M)  # two more chunks after the continuation
        nll, want_greedy = direct_nll(lm, tokens, min(scored, SEQ), extra)
        assert math.isclose(ll, -nll, rel_tol=1e-10, abs_tol=1e-10), pair
        assert greedy == want_greedy
    assert got[2][0] < got[0][0] < 0  # a longer continuation is less likely


def test_greedy_continuation_is_greedy(run_db):
    lm = make_lm(run_db)
    context = corpus_text(run_db)[:100]
    tokens = lm.tok.encode([context])[0]
    greedy = retro.generate(lm.model, lm.retriever, [context], max_new_tokens=4, temperature=0, k=2)[0].tokens
    text = lm.tok.decode(list(tokens) + greedy)
    (ll, is_greedy), = lm.loglikelihood(requests("loglikelihood", (context, text[len(lm.tok.decode(tokens)):])))
    assert is_greedy and ll < 0


def test_retrieval_off_is_retro_off_and_differs_from_on(run_db):
    on, off = make_lm(run_db), make_lm(run_db, retrieval="off")
    assert off.retriever is None
    pairs = pairs_of(run_db)[1:3]  # the continuations read the neighbours of complete chunks
    got_on = on.loglikelihood(requests("loglikelihood", *pairs))
    got_off = off.loglikelihood(requests("loglikelihood", *pairs))
    for (ll_on, _), (ll_off, _), pair in zip(got_on, got_off, pairs):
        tokens, scored = tokens_of_pair(off, *pair)
        assert math.isclose(ll_off, -direct_nll(off, tokens, scored, retrieval=False)[0], rel_tol=1e-10)
        assert abs(ll_on - ll_off) > 1e-3


def test_rolling_is_the_nll_retro_evaluate_sums(run_db):
    lm = make_lm(run_db, batch_size=3)
    texts = [corpus_text(run_db, 2)[:700], corpus_text(run_db, 3)[:90], "a"]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    for ll, text in zip(got, texts):
        tokens = lm.tok.encode([text])[0]
        # windows of SEQ tokens, each scored from its own start: every token but the first
        want = sum(direct_nll(lm, tokens[s:s + SEQ + 1], len(tokens[s + 1:s + SEQ + 1]))[0]
                   for s in range(0, len(tokens) - 1, SEQ))
        assert math.isclose(ll, -want, rel_tol=1e-10, abs_tol=1e-12)
    assert len(lm.tok.encode([texts[0]])[0]) > 2 * SEQ  # several windows
    res = evaluate(lm.model, lm.retriever, k=2, eval_set=prepare(lm.retriever, 2, seq_len=SEQ, texts=texts[:1]),
                   progress=False)
    assert math.isclose(-got[0], res.bpb_on * math.log(2) * res.bytes, rel_tol=1e-10)
    off = make_lm(run_db, retrieval="off").loglikelihood_rolling(requests("loglikelihood_rolling", (texts[0],)))
    assert math.isclose(-off[0], res.bpb_off * math.log(2) * res.bytes, rel_tol=1e-10)


def first_stop(text: str) -> str:
    """Two characters of `text` first occurring at index >= 3."""
    return next(text[i:i + 2] for i in range(3, len(text) - 1) if text.find(text[i:i + 2]) == i)


def test_generate_until_is_greedy_generate_cut_at_the_stop_string(run_db):
    lm = make_lm(run_db, batch_size=2)
    contexts = [lm.tok.decode(lm.tok.encode([corpus_text(run_db, d)])[0][:n]) for d, n in ((1, 25), (4, 20))]
    full = [g.text for g in retro.generate(lm.model, lm.retriever, contexts, max_new_tokens=20, temperature=0, k=2)]
    stops = [first_stop(t) for t in full]
    got = lm.generate_until(requests("generate_until", *[(c, {"until": [s], "max_gen_toks": 20})
                                                         for c, s in zip(contexts, stops)]))
    assert got == [t[:t.find(s)] for t, s in zip(full, stops)]
    assert all(got)
    # it stops there: retro.generate with the stop string generates fewer tokens
    cut = retro.generate(lm.model, lm.retriever, contexts[:1], max_new_tokens=20, temperature=0, k=2, stop=stops[0])
    assert cut[0].text == got[0] and len(cut[0].tokens) < 20
    # without a stop string: all max_gen_toks tokens (the EOS aside), as generate's
    assert lm.generate_until(requests("generate_until", (contexts[0], {"max_gen_toks": 20}))) == full[:1]


def test_sampled_generation_is_generates_with_the_seed(run_db):
    lm = make_lm(run_db, seed=3)
    context = lm.tok.decode(lm.tok.encode([corpus_text(run_db)])[0][:30])  # fits max_length - max_gen_toks
    kwargs = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "max_gen_toks": 12, "until": []}
    got = lm.generate_until(requests("generate_until", (context, kwargs), (context, {**kwargs, "top_k": 5})))
    want = [retro.generate(lm.model, lm.retriever, [context], max_new_tokens=12, temperature=1.5, top_k=top_k,
                           top_p=0.9, seed=3, k=2)[0].text for top_k in (0, 5)]
    assert got == want and got[0] != got[1]
    with pytest.raises(retro.RetroError, match="temperature must be a number >= 0, got -1"):
        lm.generate_until(requests("generate_until", (context, {**kwargs, "temperature": -1})))


def test_a_retrofitted_model_in_memory(run_db):
    """model= a fresh retrofit of a (tiny, random) GPT-2: RETRO[OFF] is the base model's own
    log-probability; with retrieval, the retrofit's NLL with the neighbours."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=320, n_positions=64)).double().eval()
    model = retro.retrofit(hf, chunk_size=M, backend="reference", encoder=dict(dim=16, head_dim=8)).double()
    with torch.no_grad():
        for p in model.cca.parameters():  # (zero-initialised, CCA would change nothing)
            p.normal_(0, 0.1)
    on = RetroLM(model=model, db=str(run_db[1]), k=2, max_length=SEQ, batch_size=2)
    off = RetroLM(model=model, db=str(run_db[1]), retrieval="off", max_length=SEQ)
    pairs = pairs_of(run_db)[1:3]
    got_on = on.loglikelihood(requests("loglikelihood", *pairs))
    got_off = off.loglikelihood(requests("loglikelihood", *pairs))
    for (ll_on, _), (ll_off, _), pair in zip(got_on, got_off, pairs):
        tokens, scored = tokens_of_pair(on, *pair)
        assert math.isclose(ll_on, -direct_nll(on, tokens, scored)[0], rel_tol=1e-10)
        x = torch.as_tensor(tokens[-(SEQ + 1):])
        with torch.no_grad():
            logp = hf(input_ids=x[None, :-1]).logits[0].log_softmax(-1)
        want = logp[torch.arange(len(x) - 1), x[1:]][-scored:].sum()
        assert math.isclose(ll_off, float(want), rel_tol=1e-10)
        assert abs(ll_on - ll_off) > 1e-3


def test_bad_model_arguments_are_one_line_errors(run_db):
    run, db = run_db
    for kwargs, words in ((dict(retrieval="maybe"), "retrieval must be on or off, got 'maybe'"),
                          (dict(k=0), "k must be an integer in [1, 40], got 0"),
                          (dict(batch_size="auto"), "batch_size must be an integer >= 1, got 'auto'"),
                          (dict(run=None), "give run= .* or, from Python, model="),
                          (dict(db=None), "db= .* is required")):
        with pytest.raises(retro.RetroError, match=words.replace("[", r"\[").replace("]", r"\]")):
            RetroLM(**{"run": str(run), "db": str(db), "device": "cpu", **kwargs})


def write_tasks(folder, run_db):
    """Three local tasks (jsonl data, no download): multiple choice, rolling, generation."""
    import json

    text = corpus_text(run_db)
    folder.mkdir()
    rows = {"choice": [{"context": text[:60], "choices": [text[60:80], text[200:220]], "answer": 0},
                       {"context": text[:150], "choices": [" alpha beta", text[150:170]], "answer": 1}],
            "rolling": [{"text": text[:300]}, {"text": corpus_text(run_db, 2)[:200]}],
            "generate": [{"context": text[:70], "answer": text[70:80]}]}
    for name, docs in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {folder / 'cache'}\n  data_files:\n"
              "    test: {path}\ntest_split: test\n")
    specs = {"choice": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                       "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
             "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
             "generate": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
                         "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n"
                         "metric_list:\n  - metric: exact_match\n"}
    for name, spec in specs.items():
        (folder / f"retro_{name}.yaml").write_text(f"task: retro_{name}\n" + common.replace(
            "{path}", str(folder / f"{name}.jsonl")) + spec)
    return folder


class LocalTasks(TaskManager):
    """lm-eval's TaskManager without lm-eval's own ~15,000 tasks (indexing them takes ~20 s on 2 cores)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, include_defaults=False, **kwargs)


def test_the_harness_runs_local_tasks_with_the_retro_model(run_db, tmp_path):
    run, db = run_db
    tasks = write_tasks(tmp_path / "tasks", run_db)
    out = lm_eval.simple_evaluate(model="retro", model_args=f"run={run},db={db},k=2,device=cpu",
                                  tasks=["retro_choice", "retro_rolling", "retro_generate"],
                                  task_manager=LocalTasks(include_path=str(tasks)), batch_size=2, log_samples=True)
    lm = RetroLM(run=str(run), db=str(db), k=2, device="cpu")
    samples = out["samples"]
    texts = [s["doc"]["text"] for s in samples["retro_rolling"]]
    want = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    assert [s["resps"][0][0] for s in samples["retro_rolling"]] == pytest.approx(want, rel=1e-6)
    for s in samples["retro_choice"]:
        lls = [ll for ll, _ in lm.loglikelihood(requests("loglikelihood", *[(s["doc"]["context"], " " + c)
                                                                            for c in s["doc"]["choices"]]))]
        assert s["acc"] == float(int(np.argmax(lls)) == s["doc"]["answer"])
    gen = samples["retro_generate"][0]
    doc = gen["doc"]
    assert gen["resps"][0][0] == lm.generate_until(requests("generate_until",
                                                            (doc["context"], {"until": ["\n"], "max_gen_toks": 8})))[0]
    assert 0 <= out["results"]["retro_generate"]["exact_match,none"] <= 1


def test_retro_lm_eval_command(run_db, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lm_eval.tasks.TaskManager", LocalTasks)
    run, db = run_db
    tasks = write_tasks(tmp_path / "tasks", run_db)
    args = ["lm-eval", "--model", "retro", "--tasks", "retro_rolling", "--include_path", str(tasks),
            "--batch_size", "2", "--device", "cpu"]
    assert main([*args, "--model_args", f"run={run},db={db},retrieval=off"]) == 0
    assert "retro_rolling" in capsys.readouterr().out
    assert main([*args, "--model_args", f"run={run},db={db},retrieval=sometimes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "retro lm-eval: error: retrieval must be on or off, got 'sometimes'"
