"""`retro serve`: the OpenAI-compatible API driven by the official `openai` client and raw HTTP,
continuous batching (concurrent requests give each one's single-request output), errors (an
OpenAI-style 4xx body, the server stays up), a client leaving mid-stream, 100 simultaneous
connections, SIGTERM, and the page in a headless chromium."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from tests.helpers.retrieval_helpers import ROOT, free_port
from tests.helpers.serve_helpers import running_server, trained_run, wait_until_up

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["alpha beta gamma delta river stone cloud forest engine",  # 3 chunks and a part
           "tensor chunk", "river stone cloud forest engine planet signal", "omega sigma", "kernel vector matrix",
           "topic3word1 topic3word2 alpha"]
MAX_LEN = 96


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, model, retriever, scheduler): the tiny run served in this process, 4 decoding
    slots, 16 requests queued at most."""
    from retro.retrieval import Retriever
    from retro.serve import build_scheduler, create_app
    from retro.training.train import load_model

    run, db = trained_run(tmp_path_factory.mktemp("serve"))
    model, _ = load_model(run, device="cpu")
    retriever = Retriever.load(db)
    scheduler = build_scheduler(model, retriever, retriever.db.tokenizer, max_batch=4, max_waiting=16)
    with running_server(create_app(scheduler, "tiny")) as (url, _):
        yield url, model, retriever, scheduler


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(url: str, **body) -> dict:
    r = httpx2.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def healthy(url: str) -> dict:
    r = httpx2.get(f"{url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return r.json()


# ---- the official client --------------------------------------------------------------------------


def test_openai_client_completion_stream_and_error(served):
    url, *_ = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    res = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    choice = res.choices[0]
    assert choice.text and choice.finish_reason == "length" and res.usage.completion_tokens == 20
    retrieved = choice.model_extra["retrieved"]
    assert [e["chunk"] for e in retrieved][:3] == [0, 1, 2]  # the prompt's complete chunks, then generated ones
    first = retrieved[0]["neighbours"][0]
    assert set(first) == {"id", "document", "text", "match"} and first["text"]
    streamed = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == choice.text
    assert [e for ch in streamed for e in ch.choices[0].model_extra["retrieved"]] == retrieved
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage.completion_tokens == 20
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0)
    assert err.value.status_code == 400 and "max_tokens" in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "max_tokens"


def test_greedy_output_and_neighbours_are_generates(served):
    """The scheduler decodes as retro.generate does: same tokens, same neighbours per chunk."""
    import retro

    url, model, retriever, _ = served
    res = complete(url, prompt=PROMPTS[0], max_tokens=40, temperature=0)["choices"][0]
    g = retro.generate(model, retriever, PROMPTS[0], max_new_tokens=40, temperature=0)[0]
    assert res["text"] == g.text
    assert [[n["id"] for n in e["neighbours"]] for e in res["retrieved"]] == \
        [[i for i in r["ids"] if i >= 0] for r in g.retrieved]
    assert [e["chunk"] for e in res["retrieved"]] == [r["chunk"] for r in g.retrieved]


def test_retrieval_off_is_retro_off(served):
    import retro

    url, model, retriever, _ = served
    res = complete(url, prompt=PROMPTS[0], max_tokens=30, temperature=0, retrieval=False)["choices"][0]
    g = retro.generate(model, None, PROMPTS[0], max_new_tokens=30, temperature=0, tokenizer=retriever.db.tokenizer)[0]
    assert res["retrieved"] == [] and res["text"] == g.text
    on = complete(url, prompt=PROMPTS[0], max_tokens=30, temperature=0)["choices"][0]
    assert on["retrieved"]


def test_stop_seed_and_logprobs(served):
    url, *_ = served
    a = complete(url, prompt=PROMPTS[2], max_tokens=30, temperature=1.0, seed=7)["choices"][0]
    assert complete(url, prompt=PROMPTS[2], max_tokens=30, temperature=1.0, seed=7)["choices"][0]["text"] == a["text"]
    assert complete(url, prompt=PROMPTS[2], max_tokens=30, temperature=1.0, seed=8)["choices"][0]["text"] != a["text"]
    stop = a["text"][10:13]
    cut = complete(url, prompt=PROMPTS[2], max_tokens=30, temperature=1.0, seed=7, stop=[stop, "never"])
    assert cut["choices"][0]["text"] == a["text"][:a["text"].index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = stream_events(url, prompt=PROMPTS[2], max_tokens=30, temperature=1.0, seed=7, stop=stop)
    assert "".join(e["choices"][0]["text"] for e in streamed) == cut["choices"][0]["text"]
    lp = complete(url, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 2 and chosen <= 0 and abs(max(top.values()) - chosen) < 1e-5  # greedy: the top one


def stream_events(url: str, **body) -> list[dict]:
    """The JSON events of a streamed completion (raw server-sent events), checking the [DONE] at the end."""
    events = []
    with httpx2.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- concurrency ----------------------------------------------------------------------------------


def test_concurrent_requests_decode_together_and_never_mix(served):
    """Six different prompts at once, greedy and sampled (12 requests: 4 slots, the rest queued;
    rows join and leave): each output is its single-request output, in fewer batched steps than
    one by one."""
    url, _, _, scheduler = served
    bodies = [dict(prompt=p, max_tokens=24 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    bodies += [dict(prompt=p, max_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
    steps = healthy(url)["steps"]
    alone = [complete(url, **b)["choices"][0] for b in bodies]
    sequential_steps = healthy(url)["steps"] - steps
    assert len({a["text"] for a in alone[:6]}) > 1  # the prompts' outputs differ: a mix-up would show
    steps = healthy(url)["steps"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: complete(url, **b)["choices"][0], bodies))
    assert healthy(url)["steps"] - steps < sequential_steps / 2
    for a, t in zip(alone, together):
        assert (t["text"], t["retrieved"]) == (a["text"], a["retrieved"])
    assert scheduler.load() == {"active": 0, "waiting": 0, "slots": 4, "steps": scheduler.steps, "generation": 0}


def test_no_request_is_kept_after_it_is_done(served):
    """Memory stays flat: after many requests no Job survives (benchmarks/serve.py measures the RSS)."""
    from retro.serve import Job

    url, *_ = served
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: complete(url, prompt=PROMPTS[i % 6], max_tokens=3, temperature=0), range(40)))
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is Job] == []


def test_a_hundred_simultaneous_connections(served):
    """100 requests at once on 4 slots and a queue of 16: each is served or refused with 429 and an
    OpenAI-style body; the server stays up."""
    url, *_ = served

    async def all_at_once():
        limits = httpx2.Limits(max_connections=100)
        async with httpx2.AsyncClient(limits=limits, timeout=60) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json={"prompt": PROMPTS[i % 6],
                                                                                 "max_tokens": 2, "temperature": 0})
                                          for i in range(100)])

    answers = asyncio.run(all_at_once())
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 4, codes
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error" and "busy" in r.json()["error"]["message"]
    assert healthy(url)["active"] == 0
    complete(url, prompt=PROMPTS[1], max_tokens=2)


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, says", [
    (b'{"prompt": "alpha", ', 400, "not valid JSON"),
    (b'{"prompt": "alpha", "max_token": 3}', 400, "unknown field 'max_token'"),
    (b'{"prompt": "alpha", "max_tokens": "3"}', 400, "max_tokens: Input should be a valid integer, got '3'"),
    (b'{"prompt": ["alpha"]}', 400, "prompt: Input should be a valid string"),
    (b'{"prompt": "alpha", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "alpha", "max_tokens": 0}', 400, "max_tokens: Input should be greater than or equal to 1, got 0"),
    (b'{"prompt": "alpha", "max_tokens": -5}', 400, "got -5"),
    (b'{"prompt": "alpha", "max_tokens": 96}', 400, "max_tokens must be below the model's length of 96"),
    (b'{"prompt": "alpha", "max_tokens": 94}', 400, "lower max_tokens to"),
    (("{\"prompt\": \"" + "alpha beta " * 60 + "\"}").encode(), 400, "shorten it"),
    (b'{"prompt": ""}', 400, "prompt"),
    (b'{"prompt": "alpha", "model": "gpt-4"}', 404, "'gpt-4' is not served here"),
    (b'{"prompt": "alpha", "n": 2}', 400, "n:"),
    (b'[1, 2]', 400, "the body"),
])
def test_a_bad_request_gets_an_openai_error_body_and_the_server_stays_up(served, body, status, says):
    url, *_ = served
    r = httpx2.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] in ("invalid_request_error", "not_found_error"), error
    assert healthy(url)["active"] == 0


def test_unknown_route_and_method(served):
    url, *_ = served
    assert httpx2.get(f"{url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    r = httpx2.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]


def test_a_client_leaving_mid_stream_frees_its_row(served):
    url, *_ = served
    steps = healthy(url)["steps"]
    with httpx2.stream("POST", f"{url}/v1/completions", timeout=60,
                       json={"prompt": PROMPTS[1], "max_tokens": 80, "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 30
    while healthy(url)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = healthy(url)
    assert health["active"] == 0
    time.sleep(0.3)
    assert healthy(url)["steps"] == health["steps"]  # nothing decodes for the departed client
    assert health["steps"] - steps < 40, health  # it was dropped long before its 80 tokens
    # and the server still answers: a sampled continuation may end early at the end-of-text token
    assert complete(url, prompt=PROMPTS[1], max_tokens=3)["choices"][0]["finish_reason"] in ("length", "stop")
    assert healthy(url)["active"] == 0


# ---- the command line, SIGTERM ------------------------------------------------------------------------


@pytest.mark.slow
def test_retro_serve_finishes_in_flight_requests_on_sigterm(served, tmp_path):
    """`retro serve` in a subprocess: a stream in flight when SIGTERM arrives runs to its end, then
    the server exits."""
    _, _, retriever, _ = served
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir, db = served_paths(retriever)
    proc = subprocess.Popen([sys.executable, "-m", "retro", "serve", str(run_dir), "--db", str(db), "--port", str(port),
                             "--max-batch", "2", "--log-level", "warning", "--device", "cpu"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, 300, proc)
        got, first = [], threading.Event()

        def read():
            with httpx2.stream("POST", f"{base}/v1/completions", timeout=120,
                               json={"prompt": PROMPTS[1], "max_tokens": 80, "stream": True, "temperature": 0}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got.append(line[6:])
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(120)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the usual status of a
        # process ended by SIGTERM
        assert proc.wait(120) in (0, -signal.SIGTERM), proc.stderr.read()
        assert got[-1] == "[DONE]"
        events = [json.loads(e) for e in got[:-1]]
        assert len(events) == 80 and events[-1]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx2.TransportError):
            httpx2.get(f"{base}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def served_paths(retriever):
    """(run folder, database folder) of the served fixture."""
    db = retriever.db.path
    return db.parent / "run", db


# ---- the page -------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_streams_the_continuation_and_shows_the_neighbours(served, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")
    sync_playwright = sync_playwright.sync_playwright
    url, *_ = served
    expected = complete(url, prompt=PROMPTS[0], max_tokens=40, temperature=0)["choices"][0]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=flags)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#prompt", PROMPTS[0])
            page.fill("#max-tokens", "40")
            page.click("#generate")
            page.wait_for_selector("#status:has-text('done')", timeout=60_000)
            assert page.inner_text("#continuation") == expected["text"]
            rows = page.query_selector_all("#chunks .chunk")
            assert len(rows) == len(expected["retrieved"]) >= 3
            first = expected["retrieved"][0]["neighbours"][0]
            assert page.inner_text("#chunks .chunk >> nth=0 >> .neighbour >> nth=0 >> mark") == \
                first["text"][first["match"][0]:first["match"][1]]
            assert f"document {first['document']}" in rows[0].inner_text()
            page.set_viewport_size({"width": 1200, "height": 900})
            if os.environ.get("RETRO_SCREENSHOT"):
                page.screenshot(path=os.environ["RETRO_SCREENSHOT"], full_page=True)
        finally:
            browser.close()


@pytest.mark.parametrize("argv, says", [
    (["--port", "70000"], "--port must be an integer in [0, 65535], got 70000"),
    (["--max-batch", "0"], "--max-batch must be an integer >= 1, got 0"),
    (["--max-waiting", "-1"], "--max-waiting must be an integer >= 0, got -1"),
    (["--check-every", "0"], "--check-every must be"),
])
def test_retro_serve_refuses_bad_flags_in_one_line(argv, says, capsys, tmp_path):
    from retro.app.cli import main

    assert main(["serve", str(tmp_path / "run"), "--db", str(tmp_path / "db"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retro serve: error: ") and says in err and err.count("\n") == 1, err


def test_a_retrofitted_model_is_refused_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    import retro
    from retro.serve import build_scheduler

    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    with pytest.raises(retro.RetroError, match="serves RETRO models; this run holds a RetrofittedLM"):
        build_scheduler(retro.retrofit(hf, chunk_size=4, encoder=dict(dim=16, head_dim=8)), None, None)


def test_the_usage_docs_client_example_runs(served, capsys):
    """docs/usage.md's `openai` client example ("Serving"), run as written against the test's server."""
    import re

    url, *_ = served
    text = (ROOT / "docs" / "usage.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "OpenAI(" in b]
    assert len(blocks) == 1 and "http://127.0.0.1:8000" in blocks[0]
    exec(compile(blocks[0].replace("http://127.0.0.1:8000", url), "docs/usage.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip() and "0 [" in out  # the text, then chunk 0's neighbour ids


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_usage_docs_curl_examples_run(served):
    """docs/usage.md's curl calls ("Serving"), each run as written against the test's server."""
    import re

    url, *_ = served
    text = (ROOT / "docs" / "usage.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "curl -s localhost:8000" in b)
    calls = [c.split("  #")[0] for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]
    assert len(calls) == 3
    for call in calls:
        out = subprocess.run(call.replace("localhost:8000", url), shell=True, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        if '"stream": true' in call:
            assert out.rstrip().endswith("data: [DONE]")
        else:
            assert json.loads(out)["usage"]["completion_tokens"] >= 1


def test_put_row_joins_a_prefilled_row_into_a_decoding_batch():
    """DecodeState.put_row: a prompt prefilled alone and copied into row r of a wider, longer state
    steps to the logits it gives in a state of its own, whatever the other rows hold."""
    import torch

    from retro.model.model import RetroModel, preset

    torch.manual_seed(0)
    model = RetroModel(preset("tiny", vocab_size=64, dim=32, ff_dim=64, heads=2, head_dim=16, depth=2,
                              cca_layers=(1,), enc_dim=32, enc_heads=2, enc_head_dim=16, chunk_size=4,
                              max_seq_len=32)).double().eval()
    prompts = [torch.randint(0, 64, (1, n)) for n in (3, 6, 9)]
    batch = model.new_state(4, 32)
    model.step(batch, torch.randint(0, 64, (4,)), {})  # rows holding something else before the prompts join
    alone = []
    for r, p in enumerate(prompts):
        chunks = p.shape[1] // 4  # the neighbours (k=2, [chunk, continuation] of 8 tokens) of its complete chunks
        nb = torch.randint(0, 64, (1, chunks, 2, 8)) if chunks else None
        one = model.new_state(1, p.shape[1])
        model.prefill(one, p, nb)
        batch.put_row(r + 1, one)
        own = model.new_state(1, 16)
        model.prefill(own, p, nb)
        alone.append(model.step(own, torch.tensor([5]), {}))
    together = model.step(batch, torch.tensor([7, 5, 5, 5]), {})
    for r in range(3):
        torch.testing.assert_close(together[r + 1:r + 2], alone[r], rtol=0, atol=1e-12)


def test_the_queue_takes_max_waiting_jobs_beyond_the_free_slots():
    """max_waiting counts the jobs that wait while every slot is taken: with 2 free slots and
    max_waiting 0, two jobs are taken, a third is refused."""
    from retro.serve.scheduler import Busy, Job, Scheduler

    scheduler = Scheduler.__new__(Scheduler)  # the queue alone: no model, no thread
    scheduler.max_batch, scheduler.max_waiting, scheduler.slots = 2, 0, [None, None]
    scheduler.waiting, scheduler.cond = deque(), threading.Condition()
    for _ in range(2):
        scheduler.submit(Job("a", 1, 1))
    with pytest.raises(Busy, match="2 requests are waiting for one of its 2 decoding slots"):
        scheduler.submit(Job("a", 1, 1))
