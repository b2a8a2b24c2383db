"""`retro serve`'s live knowledge: POST /v1/documents grows the served database (a new generation)
and a later completion retrieves the new document; a generation another process switches in
(`retro add-documents`) is picked up by the running server; bad
bodies and a database that cannot grow get OpenAI-style 4xx bodies, and the server stays up."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time

import httpx2
import pytest

from tests.helpers.retrieval_helpers import ROOT, run_cli
from tests.helpers.serve_helpers import running_server, trained_run

pytestmark = pytest.mark.usefixtures("one_thread")

ZEBRA = "zebraquartz violetmoss zebraquartz violetmoss zebraquartz violetmoss zebraquartz violetmoss"
HERON = "heronplume cobaltfern heronplume cobaltfern heronplume cobaltfern heronplume cobaltfern"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(base url, database folder): the tiny run served in this process on its own database
    (this module grows it), checking for new generations every 0.2 s."""
    from retro.retrieval import Retriever
    from retro.serve import build_scheduler, create_app
    from retro.training.train import load_model

    run, db = trained_run(tmp_path_factory.mktemp("serve-documents"))
    model, _ = load_model(run, device="cpu")
    retriever = Retriever.load(db)
    scheduler = build_scheduler(model, retriever, retriever.db.tokenizer, max_batch=2, max_waiting=8)
    with running_server(create_app(scheduler, "tiny", check_every=0.2)) as (url, _):
        yield url, db


def post(url: str, body, status: int = 200) -> dict:
    r = httpx2.post(f"{url}/v1/documents", json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def neighbour_documents(url: str, prompt: str) -> set[int]:
    """The documents of every neighbour a greedy completion of prompt retrieved (the prompt
    completes a chunk: it searches)."""
    r = httpx2.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    retrieved = r.json()["choices"][0]["retrieved"]
    assert retrieved, "the prompt completed no chunk"
    return {n["document"] for c in retrieved for n in c["neighbours"]}


def generation(url: str) -> int:
    return httpx2.get(f"{url}/health", timeout=10).json()["generation"]


def test_a_document_added_through_the_api_is_retrieved(live):
    url, db = live
    before = generation(url)
    assert neighbour_documents(url, ZEBRA) == set()  # no chunk of the built database shares a word with it
    out = post(url, {"documents": [{"text": ZEBRA + " the end", "source": "notes/zebra.txt"}, "a plain string one"]})
    assert out["generation"] == before + 1 == generation(url)
    first, second = out["data"]
    assert first["source"] == "notes/zebra.txt" and first["chunks"] >= 1 and second["id"] == first["id"] + 1
    assert second["source"].endswith("#2") and not (db / "api-documents").exists()  # the corpus file is gone
    assert first["id"] in neighbour_documents(url, ZEBRA)
    assert json.loads((db / "manifest.json").read_text())["generation"] == out["generation"]


def test_a_request_in_flight_decodes_on_through_an_add(live):
    """A streamed completion decoding while documents are added (and the new generation swapped in
    between two of its steps) runs to its end: the add did not stop decoding."""
    url, _ = live
    events, added = [], {}
    body = {"prompt": "zebraquartz violetmoss", "max_tokens": 60, "temperature": 0, "stream": True}  # 23 tokens
    with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    added = post(url, {"documents": [HERON.replace("heron", "egret")]})
    assert added["data"][0]["chunks"] >= 1 and len(events) == 60
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert [c["chunk"] for e in events for c in e["choices"][0]["retrieved"]] == [0, 1, 2, 3, 4]  # searched on


def test_a_generation_another_process_switches_in_is_picked_up(live, tmp_path):
    from retro.retrieval import ChunkDatabase

    url, db = live
    before = generation(url)
    (tmp_path / "heron.txt").write_text(HERON)
    run_cli("add-documents", str(db), str(tmp_path / "heron.txt"))
    grown = ChunkDatabase(db)
    deadline = time.monotonic() + 30
    while generation(url) != grown.generation and time.monotonic() < deadline:
        time.sleep(0.1)
    assert generation(url) == grown.generation == before + 1
    assert len(grown.doc_split) - 1 in neighbour_documents(url, HERON)


@pytest.mark.parametrize("body,says", [
    ({"documents": []}, "documents: List should have at least 1 item"),
    ({"documents": [""]}, "document 0 has no text"),
    ({"documents": ["ok", {"text": "  \n"}]}, "document 1 has no text"),
    ({"documents": [{"text": 3}]}, "documents.0.text: Input should be a valid string, got 3"),
    ({"documents": ["ok", 5]}, "document 1 is 5: give a string or an object"),
    ({"documents": "just a string"}, "documents"),
    ({"documents": [{"text": "x", "url": "y"}]}, "unknown field 'url'"),
    ({"docs": ["x"]}, "documents: Field required"),
    ([["x"]], "Input should be a valid dictionary"),
])
def test_a_bad_body_gets_a_400_and_the_server_stays_up(live, body, says):
    url, _ = live
    before = generation(url)
    err = post(url, body, 400)["error"]
    assert says in err["message"] and err["type"] == "invalid_request_error", err
    assert generation(url) == before
    neighbour_documents(url, ZEBRA)


def test_a_database_that_cannot_grow_gets_a_409(live, monkeypatch):
    """The update path's refusal (faiss missing for a faiss index, as open_database would say it;
    another process holding the writer lock) is a 409 body naming the reason; so is a second add
    while one runs."""
    import retro.retrieval.update as update
    from retro import RetroError
    from retro.retrieval.generations import writer_lock
    from retro.serve import live as live_module

    url, db = live
    def refuse(db, writes_index=False):
        raise RetroError(f"{str(db)!r} has a faiss index (ivf), and faiss is not installed here")

    monkeypatch.setattr(update, "open_database", refuse)
    err = post(url, {"documents": ["x y z"]}, 409)["error"]
    assert err["code"] == "database_refused" and "faiss is not installed" in err["message"], err
    monkeypatch.undo()
    with writer_lock(db):  # another writer (the lock is per open file: this process's own add is refused too)
        err = post(url, {"documents": ["x y z"]}, 409)["error"]
    assert err["code"] == "database_refused" and "is being changed by another process" in err["message"], err
    assert not (db / "api-documents").exists()
    entered, release = threading.Event(), threading.Event()

    def slow_add(self, documents):
        entered.set()
        release.wait(30)
        return {"data": []}

    monkeypatch.setattr(live_module.LiveDatabase, "_add", slow_add)
    first = threading.Thread(target=lambda: httpx2.post(f"{url}/v1/documents", json={"documents": ["a"]}, timeout=30))
    first.start()
    assert entered.wait(30)
    r = httpx2.post(f"{url}/v1/documents", json={"documents": ["b"]}, timeout=30)
    release.set()
    first.join()
    assert r.status_code == 409 and r.json()["error"]["code"] == "add_in_progress", r.text
    neighbour_documents(url, ZEBRA)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_usage_docs_documents_curl_example_runs(live):
    """docs/usage.md's POST /v1/documents call ("Serving"), run as written against the test's server."""
    url, _ = live
    text = (ROOT / "docs" / "usage.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "/v1/documents" in b)
    calls = [c.split("  #")[0] for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]
    assert calls
    for call in calls:
        out = json.loads(subprocess.run(call.replace("localhost:8000", url), shell=True, capture_output=True,
                                        text=True, timeout=120, check=True).stdout)
        assert out["data"] and all(d["chunks"] >= 1 for d in out["data"]), out
